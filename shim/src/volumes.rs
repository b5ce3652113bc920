//! Volumes: the bind mounts of host paths in a container's spec (`ctr run --mount`, `docker run
//! -v`, CRI's hosts/resolv.conf/hostname and kubelet's volumes) carried into the guest.
//!
//! Kata's layout: each source is bound into the sandbox's host-only tree
//! (`<run>/mounts/<container>/volumes/<n>`), which the guest sees through the read-only export
//! (`vmm_driver::share`) at `GUEST_SHARE/<container>/volumes/<n>`; the spec's source is
//! rewritten to that guest path, so the agent binds it like any guest path. The guest can't
//! create, rename or plant names at the top of the share, and every host bind is
//! `nosuid,nodev` (read-only where the spec says `ro`, on the host as well as in the guest).
//!
//! What can't cross virtio-fs is handled here, before anything is mounted:
//! - device nodes and `/proc`, `/sys`, `/dev` paths are the host's, not the guest's: skipped,
//!   with a log line naming them (the guest has its own);
//! - `/dev/shm` is left to the agent, which makes it a guest tmpfs shared by the pod (POSIX
//!   shared memory needs a local tmpfs: shared mmap of a FUSE file is not shared memory);
//! - kubelet's emptyDir with `medium: Memory` (a host tmpfs) becomes a guest tmpfs shared by
//!   the pod (`EPHEMERAL_DIR`), so its memory stays in the VM;
//! - a source that does not exist, a unix socket or a fifo fails the create with an error that
//!   names it (a socket or fifo can't carry traffic between guest and host).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// Where the agent mounts the share in the guest (`agent::init::SHARED_MOUNT`).
pub use cocoon_protocol::{EPHEMERAL_DIR, GUEST_SHARE};

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

impl SourceKind {
    /// The kind of `path` (following symlinks, as a bind mount does).
    pub fn of(path: &Path) -> std::io::Result<SourceKind> {
        use std::os::unix::fs::FileTypeExt;
        let t = std::fs::metadata(path)?.file_type();
        Ok(if t.is_dir() && is_memory_empty_dir(path) {
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
        })
    }
}

/// kubelet puts emptyDir volumes at `…/volumes/kubernetes.io~empty-dir/<name>`; with
/// `medium: Memory` that directory is the root of a tmpfs (Kata's test, too).
fn is_memory_empty_dir(path: &Path) -> bool {
    let kubelet_empty_dir = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|p| p == "kubernetes.io~empty-dir");
    kubelet_empty_dir
        && nix::sys::statfs::statfs(path)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// The guest directory for a memory emptyDir: one per source path, so every container of the
/// pod that mounts the same volume gets the same tmpfs.
fn ephemeral_dir(source: &Path) -> String {
    let name: String = source
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{EPHEMERAL_DIR}/{name}")
}

/// One host bind the shim makes for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host path the spec names.
    pub source: PathBuf,
    /// Relative to the container's directory in the host tree (`volumes/<n>`).
    pub target: PathBuf,
    pub is_dir: bool,
    /// `rbind`: submounts of the source come along.
    pub recursive: bool,
    pub readonly: bool,
}

/// The spec as the guest gets it, and the binds to make on the host first.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub spec: Value,
    pub binds: Vec<Bind>,
    /// Guest tmpfs directories the agent provides (`CreateContainerRequest.ephemeral`).
    pub ephemeral: Vec<String>,
}

/// Host paths that are the host's own view of the system: the guest has its own.
const HOST_ONLY: [&str; 3] = ["/proc", "/sys", "/dev"];

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind" || options(m).any(|o| o == "bind" || o == "rbind")
}

fn options(m: &Value) -> impl Iterator<Item = &str> {
    m["options"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn under(path: &Path, dir: &str) -> bool {
    path.starts_with(dir)
}

/// Plans the volumes of container `cid` from its spec. `kind` tells what a host path is.
pub fn plan(
    spec: &Value,
    cid: &str,
    kind: impl Fn(&Path) -> std::io::Result<SourceKind>,
) -> Result<Plan> {
    let mut spec = spec.clone();
    let mut binds = vec![];
    let mut ephemeral = vec![];
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok(Plan {
            spec,
            binds,
            ephemeral,
        });
    };
    let mut kept = Vec::with_capacity(mounts.len());
    for mut m in mounts.drain(..) {
        let dest = m["destination"].as_str().unwrap_or("").to_owned();
        if dest == "/dev/shm" {
            // The agent makes it a guest tmpfs, shared by the pod (`spec::pod_shm`).
            kept.push(m);
            continue;
        }
        if !is_bind(&m) {
            kept.push(m);
            continue;
        }
        let source = PathBuf::from(m["source"].as_str().unwrap_or(""));
        if !source.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "bind mount of {source:?} at {dest}: the source must be an absolute host path"
            )));
        }
        if HOST_ONLY.iter().any(|d| under(&source, d)) {
            log::warn!(
                "container {cid}: skipping the bind mount of host path {} at {dest}: the guest \
                 has its own /proc, /sys and /dev",
                source.display()
            );
            continue;
        }
        let k = kind(&source).map_err(|e| {
            Error::InvalidArgument(format!(
                "bind mount source {} (for {dest}): {e}",
                source.display()
            ))
        })?;
        let is_dir = match k {
            SourceKind::MemoryDir => {
                // A guest tmpfs, shared by the pod: memory stays in the VM, as it would in
                // the container's own memory under runc.
                let dir = ephemeral_dir(&source);
                m["source"] = Value::String(dir.clone());
                if !ephemeral.contains(&dir) {
                    ephemeral.push(dir);
                }
                kept.push(m);
                continue;
            }
            SourceKind::Dir => true,
            SourceKind::File => false,
            SourceKind::Device => {
                log::warn!(
                    "container {cid}: skipping the bind mount of host device {} at {dest}: a \
                     host device node does not reach the guest",
                    source.display()
                );
                continue;
            }
            SourceKind::Socket | SourceKind::Fifo => {
                return Err(Error::InvalidArgument(format!(
                    "bind mount source {} (for {dest}) is a {}: it can't carry traffic between \
                     the pod VM and the host; use a TCP or vsock endpoint instead",
                    source.display(),
                    if k == SourceKind::Socket {
                        "unix socket"
                    } else {
                        "fifo"
                    }
                )));
            }
        };
        let n = binds.len();
        let target = PathBuf::from("volumes").join(n.to_string());
        binds.push(Bind {
            source,
            target: target.clone(),
            is_dir,
            recursive: m["type"] == "rbind" || options(&m).any(|o| o == "rbind"),
            readonly: options(&m).any(|o| o == "ro"),
        });
        m["source"] = Value::String(format!("{GUEST_SHARE}/{cid}/{}", target.display()));
        kept.push(m);
    }
    *mounts = kept;
    Ok(Plan {
        spec,
        binds,
        ephemeral,
    })
}

/// Binds `source` at `target` (created as an empty file or directory), then makes the bind
/// `nosuid,nodev`, and read-only if asked. On failure nothing is left mounted.
pub fn bind(b: &Bind, target: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    let io = |what: String, e: nix::Error| Error::io(what, std::io::Error::from(e));
    if b.is_dir {
        std::fs::create_dir_all(target)
    } else {
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)
                .map_err(|e| Error::io(format!("create {}", p.display()), e))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
            .map(drop)
    }
    .map_err(|e| Error::io(format!("create {}", target.display()), e))?;
    let none: Option<&str> = None;
    let mut flags = MsFlags::MS_BIND;
    if b.recursive {
        flags |= MsFlags::MS_REC;
    }
    nix::mount::mount(Some(&b.source), target, none, flags, none).map_err(|e| {
        io(
            format!("bind {} at {}", b.source.display(), target.display()),
            e,
        )
    })?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if b.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    if let Err(e) = nix::mount::mount(none, target, none, flags, none) {
        crate::rootfs::unmount(target);
        return Err(io(format!("remount {} nosuid,nodev", target.display()), e));
    }
    Ok(())
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

    fn kinds(p: &Path) -> std::io::Result<SourceKind> {
        match p.to_str().unwrap_or("") {
            "/data" | "/var/lib/kubelet/pods/u/volumes/cm" => Ok(SourceKind::Dir),
            "/etc/hosts-of-pod" => Ok(SourceKind::File),
            "/run/app.sock" => Ok(SourceKind::Socket),
            "/run/fifo" => Ok(SourceKind::Fifo),
            "/mnt/disk" => Ok(SourceKind::Device),
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache" => {
                Ok(SourceKind::MemoryDir)
            }
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }

    fn spec(mounts: Value) -> Value {
        serde_json::json!({"mounts": mounts})
    }

    #[test]
    fn host_binds_are_rewritten_to_the_share_and_planned_in_order() {
        let s = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts-of-pod",
             "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/data", "source": "/data", "options": ["rbind", "rw"]},
            {"destination": "/cm", "type": "none", "source": "/var/lib/kubelet/pods/u/volumes/cm",
             "options": ["bind"]},
        ]));
        let p = plan(&s, "c1", kinds).unwrap();
        let m = p.spec["mounts"].as_array().unwrap();
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(m[1]["source"], format!("{GUEST_SHARE}/c1/volumes/0"));
        assert_eq!(
            m[1]["options"],
            serde_json::json!(["rbind", "rprivate", "ro"])
        );
        assert_eq!(m[3]["source"], format!("{GUEST_SHARE}/c1/volumes/2"));
        assert_eq!(
            p.binds,
            vec![
                Bind {
                    source: "/etc/hosts-of-pod".into(),
                    target: "volumes/0".into(),
                    is_dir: false,
                    recursive: true,
                    readonly: true
                },
                Bind {
                    source: "/data".into(),
                    target: "volumes/1".into(),
                    is_dir: true,
                    recursive: true,
                    readonly: false
                },
                Bind {
                    source: "/var/lib/kubelet/pods/u/volumes/cm".into(),
                    target: "volumes/2".into(),
                    is_dir: true,
                    recursive: false,
                    readonly: false
                },
            ]
        );
    }

    #[test]
    fn a_memory_empty_dir_becomes_one_guest_tmpfs_for_the_pod() {
        let src = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache";
        let s = spec(serde_json::json!([
            {"destination": "/cache", "type": "bind", "source": src, "options": ["rbind"]},
            {"destination": "/cache2", "type": "bind", "source": src, "options": ["rbind"]},
        ]));
        let p = plan(&s, "c1", kinds).unwrap();
        assert!(p.binds.is_empty());
        assert_eq!(p.ephemeral.len(), 1);
        assert!(p.ephemeral[0].starts_with(EPHEMERAL_DIR));
        assert!(!p.ephemeral[0][EPHEMERAL_DIR.len() + 1..].contains('/'));
        let m = p.spec["mounts"].as_array().unwrap();
        assert_eq!(m[0]["source"], p.ephemeral[0].as_str());
        assert_eq!(m[1]["source"], p.ephemeral[0].as_str());
    }

    #[test]
    fn what_cannot_cross_is_skipped_or_refused_by_name() {
        let skipped = spec(serde_json::json!([
            {"destination": "/host-proc", "type": "bind", "source": "/proc/1", "options": ["rbind"]},
            {"destination": "/disk", "type": "bind", "source": "/mnt/disk", "options": ["bind"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm",
             "options": ["rbind", "ro"]},
        ]));
        let p = plan(&skipped, "c1", kinds).unwrap();
        assert!(p.binds.is_empty());
        let m = p.spec["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0]["source"], "/run/containerd/x/shm", "left to the agent");

        for (src, says) in [
            ("/nope", "/nope"),
            ("/run/app.sock", "unix socket"),
            ("/run/fifo", "fifo"),
            ("relative", "absolute"),
        ] {
            let s = spec(serde_json::json!([
                {"destination": "/x", "type": "bind", "source": src, "options": ["bind"]}
            ]));
            let e = plan(&s, "c1", kinds).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("/x"), "{src}: {e}");
        }
    }
}
