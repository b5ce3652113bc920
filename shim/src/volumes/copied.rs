//! Small host sources copied into the guest instead of shared (issue #29, Kata's
//! `shared_fs = none` way): the pod's `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf`,
//! any other small read-only file, and kubelet's configMap, secret, projected and downward-API
//! volumes (read-only directories of a few small files, updated by kubelet's atomic writer).
//! The agent keeps the copy at `FILES_DIR/<name>` (one per source, shared by the pod's
//! containers); the pod re-sends a source whose files changed (`pod/copies.rs`).
//!
//! What a container sees differs from a bind in two ways, both documented for users: a host
//! change arrives within the poll interval rather than at once, and the container's writes to
//! a writable pod file (`/etc/hosts`) stay in the pod instead of reaching the host file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cocoon_protocol::agent::{FileEntry, FileKind};

use super::{Bind, HostPath, SourceKind};

/// The largest file, and the most bytes in one copied directory, that are copied.
pub const COPY_MAX_BYTES: u64 = 1 << 20;
/// The most entries in one copied directory (kubelet's layout doubles a volume's keys).
pub const COPY_MAX_ENTRIES: usize = 256;

/// The destinations of the per-pod files that containerd and Docker bind writable.
const POD_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];
/// kubelet's volume plugins whose directories are read-only, small and replaced atomically.
const PROJECTED_VOLUMES: [&str; 4] = [
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];

/// One bind that the agent gets as a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// One name below `FILES_DIR`, the same for every bind of one source.
    pub name: String,
    /// The bind to make instead when the source turns out too big to copy.
    pub bind: Bind,
    /// The guest's copy goes back to the host file when the container exits
    /// ([`copied_back`]).
    pub back: bool,
}

/// Whether the bind of `h` at `dest` is copied rather than shared.
pub fn copyable(dest: &str, source: &Path, h: &HostPath, readonly: bool) -> bool {
    match h.kind {
        SourceKind::File => {
            h.size <= COPY_MAX_BYTES
                && (readonly || POD_FILES.contains(&dest) || copied_back(source, h, readonly))
        }
        SourceKind::Dir => {
            readonly
                && source
                    .parent()
                    .and_then(Path::file_name)
                    .is_some_and(|p| PROJECTED_VOLUMES.iter().any(|v| p == *v))
        }
        _ => false,
    }
}

/// Whether the bind is kubelet's termination log (`…/pods/<uid>/containers/<name>/<id>`,
/// writable, empty at start): copied in, and its content written back to the host file when
/// the container exits, before the exit is published, which is when kubelet reads it.
pub fn copied_back(source: &Path, h: &HostPath, readonly: bool) -> bool {
    !readonly
        && h.kind == SourceKind::File
        && source
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .is_some_and(|n| n == "containers")
        && source
            .ancestors()
            .nth(4)
            .and_then(Path::file_name)
            .is_some_and(|n| n == "pods")
}

/// The copy's name for `source`: its last name, readable in logs, and a hash of the whole
/// path, so two sources never share a copy.
pub fn name_for(source: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    let last: String = source
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{}-{:016x}", last.trim_start_matches('.'), h.finish())
}

/// What the copy of a source was made from: each entry's metadata, in walk order. Any write,
/// rename, chmod or chown on the host changes it (the ctime moves).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp(Vec<EntryStamp>);

/// One entry's part of a [`Stamp`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryStamp {
    rel: PathBuf,
    ino: u64,
    ctime: (i64, i64),
    size: u64,
    mode: u32,
    owner: (u32, u32),
}

impl Stamp {
    fn add(&mut self, rel: &Path, m: &std::fs::Metadata) {
        self.0.push(EntryStamp {
            rel: rel.to_path_buf(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            size: m.size(),
            mode: m.mode(),
            owner: (m.uid(), m.gid()),
        });
    }
}

/// Why a source can't be copied.
#[derive(Debug)]
pub enum Uncopyable {
    /// More than the limits; the reason says which.
    TooBig(String),
    Io(std::io::Error),
}

impl std::fmt::Display for Uncopyable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uncopyable::TooBig(why) => f.write_str(why),
            Uncopyable::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Only the metadata of `source`'s tree: what the poll compares.
pub fn stamp(source: &Path) -> Result<Stamp, Uncopyable> {
    walk(source, false).map(|(_, s)| s)
}

/// `source`'s tree as the agent gets it, parents before children, and its stamp. Each
/// entry's metadata is taken before its content, so a change in between shows at the next
/// poll.
pub fn read(source: &Path) -> Result<(Vec<FileEntry>, Stamp), Uncopyable> {
    walk(source, true)
}

fn walk(source: &Path, content: bool) -> Result<(Vec<FileEntry>, Stamp), Uncopyable> {
    // The top is followed, as a bind mount follows it; nothing below is.
    let top = std::fs::metadata(source).map_err(Uncopyable::Io)?;
    let mut w = Walk {
        content,
        entries: vec![],
        stamp: Stamp::default(),
        bytes: 0,
    };
    w.visit(source, Path::new(""), &top)?;
    Ok((w.entries, w.stamp))
}

struct Walk {
    content: bool,
    entries: Vec<FileEntry>,
    stamp: Stamp,
    bytes: u64,
}

impl Walk {
    fn visit(&mut self, at: &Path, rel: &Path, m: &std::fs::Metadata) -> Result<(), Uncopyable> {
        let t = m.file_type();
        let kind = if t.is_dir() {
            FileKind::DIRECTORY
        } else if t.is_symlink() {
            FileKind::SYMLINK
        } else if t.is_file() {
            FileKind::REGULAR
        } else {
            // A socket or device below a projected volume has no place in a copy.
            log::debug!(
                "{}: not a file, directory or symlink; not copied",
                at.display()
            );
            return Ok(());
        };
        if self.stamp.0.len() >= COPY_MAX_ENTRIES {
            return Err(Uncopyable::TooBig(format!(
                "more than {COPY_MAX_ENTRIES} entries"
            )));
        }
        self.stamp.add(rel, m);
        self.bytes += if kind == FileKind::REGULAR {
            m.size()
        } else {
            0
        };
        if self.bytes > COPY_MAX_BYTES {
            return Err(Uncopyable::TooBig(format!(
                "more than {COPY_MAX_BYTES} bytes"
            )));
        }
        let mut e = FileEntry {
            path: rel.to_string_lossy().into_owned(),
            kind: kind.into(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            ..Default::default()
        };
        if self.content && kind == FileKind::REGULAR {
            e.data = std::fs::read(at).map_err(Uncopyable::Io)?;
        }
        if kind == FileKind::SYMLINK {
            e.target = std::fs::read_link(at)
                .map_err(Uncopyable::Io)?
                .to_string_lossy()
                .into_owned();
        }
        self.entries.push(e);
        if kind == FileKind::DIRECTORY {
            let mut names: Vec<_> = std::fs::read_dir(at)
                .map_err(Uncopyable::Io)?
                .map(|d| d.map(|d| d.file_name()))
                .collect::<Result<_, _>>()
                .map_err(Uncopyable::Io)?;
            names.sort();
            for n in names {
                let child = at.join(&n);
                let cm = std::fs::symlink_metadata(&child).map_err(Uncopyable::Io)?;
                self.visit(&child, &rel.join(&n), &cm)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(kind: SourceKind, size: u64) -> HostPath {
        HostPath {
            kind,
            inode: (1, 1),
            tmpfs_size: None,
            size,
        }
    }

    #[test]
    fn pod_files_small_read_only_files_and_kubelet_volumes_are_copied() {
        let file = host(SourceKind::File, 200);
        let sb = Path::new("/var/lib/containerd/sandboxes/x/hosts");
        assert!(copyable("/etc/hosts", sb, &file, false));
        assert!(copyable("/etc/resolv.conf", sb, &file, false));
        assert!(copyable(
            "/cfg/app.conf",
            Path::new("/etc/app.conf"),
            &file,
            true
        ));
        assert!(
            !copyable("/data/log", Path::new("/var/log/x"), &file, false),
            "writable"
        );
        let log = Path::new("/var/lib/kubelet/pods/u1/containers/app/0a1b2c3d");
        assert!(copyable("/dev/termination-log", log, &file, false));
        assert!(copied_back(log, &file, false));
        assert!(
            !copied_back(log, &file, true),
            "read-only: nothing to bring back"
        );
        assert!(!copied_back(
            Path::new("/srv/containers/app/x"),
            &file,
            false
        ));
        assert!(!copied_back(sb, &file, false));
        let big = host(SourceKind::File, COPY_MAX_BYTES + 1);
        assert!(!copyable("/etc/hosts", sb, &big, true));

        let dir = host(SourceKind::Dir, 4096);
        let vol = |plugin: &str| format!("/var/lib/kubelet/pods/u/volumes/{plugin}/v");
        for p in PROJECTED_VOLUMES {
            assert!(copyable("/cfg", Path::new(&vol(p)), &dir, true), "{p}");
            assert!(
                !copyable("/cfg", Path::new(&vol(p)), &dir, false),
                "{p} writable"
            );
        }
        assert!(!copyable(
            "/d",
            Path::new(&vol("kubernetes.io~empty-dir")),
            &dir,
            true
        ));
        assert!(
            !copyable("/d", Path::new("/srv/data"), &dir, true),
            "a host directory"
        );
    }

    #[test]
    fn names_are_one_component_and_differ_per_source() {
        let a = name_for(Path::new("/a/b_c"));
        let b = name_for(Path::new("/a_b/c"));
        assert_ne!(a, b);
        assert_eq!(a, name_for(Path::new("/a/b_c")));
        let odd = name_for(Path::new("/x/..data/we ird"));
        assert!(!odd.contains('/') && !odd.starts_with('.'), "{odd}");
    }

    #[test]
    fn a_tree_is_read_parents_first_with_symlinks_as_they_are_and_its_stamp_moves() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("v");
        std::fs::create_dir_all(v.join("..1")).unwrap();
        std::fs::write(v.join("..1/k"), "one").unwrap();
        std::os::unix::fs::symlink("..1", v.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/k", v.join("k")).unwrap();
        let (entries, st) = read(&v).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["", "..1", "..1/k", "..data", "k"]);
        assert_eq!(entries[2].data, b"one");
        assert_eq!(entries[3].target, "..1");
        assert_eq!(stamp(&v).unwrap(), st);
        std::fs::write(v.join("..1/k"), "two").unwrap();
        assert_ne!(stamp(&v).unwrap(), st, "an in-place write moves the stamp");
    }

    #[test]
    fn too_many_bytes_or_entries_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("a"),
            vec![0u8; (COPY_MAX_BYTES / 2 + 1) as usize],
        )
        .unwrap();
        std::fs::write(
            d.path().join("b"),
            vec![0u8; (COPY_MAX_BYTES / 2 + 1) as usize],
        )
        .unwrap();
        assert!(matches!(read(d.path()), Err(Uncopyable::TooBig(_))));
        let d = tempfile::tempdir().unwrap();
        for i in 0..COPY_MAX_ENTRIES {
            std::fs::write(d.path().join(i.to_string()), "").unwrap();
        }
        assert!(matches!(stamp(d.path()), Err(Uncopyable::TooBig(_))));
    }
}
