//! Volumes: the bind mounts of host paths in a container's spec (`ctr run --mount`, `docker run
//! -v`, CRI's hosts/resolv.conf/hostname and kubelet's volumes) carried into the guest.
//!
//! Kata's layout: each source is bound at a slot of the sandbox's tree (`_volumes/<n>`), which
//! the guest sees through the read-only export (`vmm_driver::share`) at
//! `GUEST_SHARE/_volumes/<n>`; the spec's source is rewritten to that guest path, so the agent
//! binds it like any guest path. The bind exists only in virtiofsd's mount namespace ([`ns`]),
//! as runc's exists only in the container's; on the host the slot is an empty mount point. The
//! guest can't create, rename or plant names at the top of the share, and every bind is
//! `nosuid,nodev` (read-only where the spec says `ro`, on the host side of virtiofsd as well as
//! in the guest). A source that several containers of the pod bind the same way is bound once
//! and reference-counted ([`Slots`]).
//!
//! What can't cross virtio-fs is handled by [`plan`], before anything is mounted:
//! - device nodes and `/proc`, `/sys`, `/dev` paths are the host's, not the guest's: skipped,
//!   with a log line naming them (the guest has its own);
//! - `/dev/shm` becomes a guest tmpfs of the host one's size, shared by the pod (POSIX shared
//!   memory needs a local tmpfs: shared mmap of a FUSE file is not shared memory);
//! - kubelet's emptyDir with `medium: Memory` (a host tmpfs) becomes a guest tmpfs of the same
//!   size, shared by the pod (`EPHEMERAL_DIR`), so its memory stays in the VM;
//! - a source that does not exist, a unix socket or a fifo fails the create with an error that
//!   names it (a socket or fifo can't carry traffic between guest and host).

pub mod copied;
pub mod ns;
mod plan;
mod slots;

use std::path::{Path, PathBuf};

pub use ns::Placement;
pub use plan::{plan, Bind, Ephemeral, Plan, DEFAULT_SHM_SIZE};
pub use slots::{Slots, SLOTS_DIR};

use crate::{Error, Result};

/// Where the agent mounts the share in the guest (`agent::init::SHARED_MOUNT`).
pub use cocoon_protocol::{EPHEMERAL_DIR, FILES_DIR, GUEST_SHARE};

/// The kind of a bind source on the host, as far as volumes care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Dir,
    /// kubelet's emptyDir with `medium: Memory`: a tmpfs of its own on the host.
    MemoryDir,
    File,
    Socket,
    Fifo,
    Device,
}

/// What [`plan`] needs to know about a host path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPath {
    pub kind: SourceKind,
    /// (device, inode): a file replaced under the same name is a different source.
    pub inode: (u64, u64),
    /// The size of the tmpfs the path is on, if it is on one.
    pub tmpfs_size: Option<u64>,
    /// The file's size (a directory's own, not its tree's).
    pub size: u64,
}

impl HostPath {
    /// Looks at `path` on the host (following symlinks, as a bind mount does).
    pub fn of(path: &Path) -> std::io::Result<HostPath> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path)?;
        let t = meta.file_type();
        let tmpfs_size = nix::sys::statfs::statfs(path).ok().and_then(|s| {
            (s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC).then(|| {
                u64::try_from(s.block_size())
                    .unwrap_or(0)
                    .saturating_mul(s.blocks())
            })
        });
        let kind = if t.is_dir() && tmpfs_size.is_some() && is_kubelet_empty_dir(path) {
            SourceKind::MemoryDir
        } else if t.is_dir() {
            SourceKind::Dir
        } else if t.is_socket() {
            SourceKind::Socket
        } else if t.is_fifo() {
            SourceKind::Fifo
        } else if t.is_block_device() || t.is_char_device() {
            SourceKind::Device
        } else {
            SourceKind::File
        };
        Ok(HostPath {
            kind,
            inode: (meta.dev(), meta.ino()),
            tmpfs_size,
            size: meta.len(),
        })
    }
}

/// kubelet puts emptyDir volumes at `…/volumes/kubernetes.io~empty-dir/<name>`; with
/// `medium: Memory` that directory is the root of a tmpfs (Kata's test, too).
fn is_kubelet_empty_dir(path: &Path) -> bool {
    path.parent()
        .and_then(Path::file_name)
        .is_some_and(|p| p == "kubernetes.io~empty-dir")
}

/// Creates `path` as an empty directory or file to mount on.
fn mount_point(path: &Path, is_dir: bool) -> Result<()> {
    if is_dir {
        std::fs::create_dir_all(path)
    } else {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)
                .map_err(|e| Error::io(format!("create {}", p.display()), e))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(drop)
    }
    .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

/// Binds `b.source` at `target`, a name below the exported tree that the guest will see it
/// at, inside virtiofsd's mount namespace ([`ns`]): the host's namespace never holds the bind.
/// The bind is made at `staging` (outside the exported tree) first and made `nosuid,nodev`
/// (and read-only if asked, below too for `rro`) there; the clone that virtiofsd gets keeps
/// those flags mount by mount. On failure nothing is left mounted.
pub fn bind(b: &Bind, staging: &Path, target: &Path, at: &Placement) -> Result<()> {
    use nix::mount::MsFlags;
    let io = |what: String, e: nix::Error| Error::io(what, std::io::Error::from(e));
    let none: Option<&str> = None;
    mount_point(staging, b.is_dir)?;
    let staged = (|| {
        let mut flags = MsFlags::MS_BIND;
        if b.recursive {
            flags |= MsFlags::MS_REC;
        }
        nix::mount::mount(Some(&b.source), staging, none, flags, none).map_err(|e| {
            io(
                format!("bind {} at {}", b.source.display(), staging.display()),
                e,
            )
        })?;
        let mut flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if b.readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(none, staging, none, flags, none)
            .map_err(|e| io(format!("remount {} nosuid,nodev", staging.display()), e))?;
        let below = if b.recursive {
            mounts_below(staging)
        } else {
            vec![]
        };
        for rel in &below {
            restrict(&staging.join(rel), b.recursive_readonly)?;
        }
        mount_point(target, b.is_dir)?;
        ns::place(staging, b.recursive, at)
    })();
    // The staging mount goes in every case: the placed clone holds its own reference.
    crate::unmount::unmount(staging);
    remove_target(staging);
    if staged.is_err() {
        remove_target(target);
    }
    staged
}

/// Makes the mount at `path` (one below a volume) `nosuid,nodev`, as every mount the guest is
/// served, and read-only if `readonly` (`rro`) or if it already is; keeps its `noexec` and
/// atime flags: a bind remount sets exactly the flags given.
fn restrict(path: &Path, readonly: bool) -> Result<()> {
    use nix::mount::MsFlags;
    use nix::sys::statvfs::FsFlags;
    let kept = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?
        .flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    for (has, set) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if kept.contains(has) {
            flags |= set;
        }
    }
    let none: Option<&str> = None;
    nix::mount::mount(none, path, none, flags, none).map_err(|e| {
        let what = if readonly {
            "read-only (rro)"
        } else {
            "nosuid,nodev"
        };
        Error::io(format!("remount {} {what}", path.display()), e.into())
    })
}

/// The mount points strictly below `dir` in the shim's mount namespace, relative to it (from
/// mountinfo, whose octal escapes are decoded), shallowest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    mounts_below_in("self", dir)
}

/// [`mounts_below`] as the process `pid` sees them: its namespace, `dir` from its root.
pub fn mounts_below_in(pid: &str, dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let mut below: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter_map(|p| p.strip_prefix(dir).ok().map(Path::to_path_buf))
        .filter(|rel| !rel.as_os_str().is_empty())
        .collect();
    below.sort_by_key(|p| p.components().count());
    below.dedup();
    below
}

/// mountinfo's escapes (`\040` for a space, and so on) back to the bytes.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a volume mount point after its unmount: never recursively (a failed unmount must
/// not empty the source through it), and without following a symlink.
pub fn remove_target(target: &Path) {
    if std::fs::remove_dir(target).is_err() {
        let is_file = std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_file());
        if is_file {
            let _ = std::fs::remove_file(target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded_and_mounts_below_a_dir_are_relative() {
        assert_eq!(unescape("/a\\040b\\011c"), "/a b\tc");
        assert_eq!(unescape("/plain\\"), "/plain\\");
        // /proc is a mount point below /, and / itself is not "below".
        let below = mounts_below(Path::new("/"));
        assert!(below.contains(&PathBuf::from("proc")), "{below:?}");
        assert!(below.iter().all(|p| p.is_relative()));
    }
}
