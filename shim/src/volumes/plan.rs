//! The plan of a container's volumes, made from its spec before anything boots or mounts:
//! which host paths to bind, what becomes a guest tmpfs, what is skipped and what is refused
//! (see the module above). Pure: what a host path is comes from the caller.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::copied::{copied_back, copyable, name_for, Copy};
use super::{HostPath, SourceKind, EPHEMERAL_DIR, FILES_DIR};
use crate::{Error, Result};

/// The size of a `/dev/shm` whose host source is not a tmpfs: runc's and containerd's default.
pub const DEFAULT_SHM_SIZE: u64 = 64 << 20;

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
    /// The source's (device, inode) when planned.
    pub inode: (u64, u64),
    pub is_dir: bool,
    /// `rbind`: submounts of the source come along.
    pub recursive: bool,
    pub readonly: bool,
    /// `rro`: the mounts below the source are read-only too (the guest applies it with
    /// `mount_setattr(AT_RECURSIVE)`; the host's bind does the same, so the guest can't
    /// write through virtiofsd what its container can't).
    pub recursive_readonly: bool,
    /// Which of the planned spec's mounts it is: its source becomes the guest path.
    pub mount: usize,
}

/// A guest tmpfs the agent provides (`CreateContainerRequest.ephemeral_volumes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ephemeral {
    pub path: String,
    /// The host tmpfs's size (kubelet sets it from the volume's `sizeLimit`).
    pub size: u64,
}

/// The spec as the guest gets it (bind sources still to be rewritten, see [`Bind::mount`]),
/// and the binds to make on the host first.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub spec: Value,
    pub binds: Vec<Bind>,
    pub ephemeral: Vec<Ephemeral>,
    /// The binds the agent gets as copies (`copied.rs`); their spec source is already the
    /// guest path.
    pub copies: Vec<Copy>,
    /// Guest paths of host mounts below the recursive binds, once they are bound
    /// (`Pod::bind_volumes`).
    pub submounts: Vec<String>,
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

/// The pod's `/dev/shm` as a guest tmpfs of the host one's size (CRI binds the sandbox's shm,
/// Docker a tmpfs of `--shm-size`). The agent binds a CRI pod member's to the sandbox's.
fn shm(size: u64) -> Value {
    serde_json::json!({
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "nodev", "noexec", "mode=1777", format!("size={size}")],
    })
}

/// Plans the volumes of container `cid` from its spec. `host` tells what a host path is.
pub fn plan(
    spec: &Value,
    cid: &str,
    host: impl Fn(&Path) -> std::io::Result<HostPath>,
) -> Result<Plan> {
    let mut spec = spec.clone();
    let mut binds = vec![];
    let mut ephemeral: Vec<Ephemeral> = vec![];
    let mut copies: Vec<Copy> = vec![];
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok(Plan {
            spec,
            binds,
            ephemeral,
            copies: vec![],
            submounts: vec![],
        });
    };
    let mut kept = Vec::with_capacity(mounts.len());
    for mut m in mounts.drain(..) {
        let dest = m["destination"].as_str().unwrap_or("").to_owned();
        if !is_bind(&m) {
            kept.push(m);
            continue;
        }
        let source = PathBuf::from(m["source"].as_str().unwrap_or(""));
        if dest == "/dev/shm" {
            let size = host(&source)
                .ok()
                .and_then(|h| h.tmpfs_size)
                .unwrap_or(DEFAULT_SHM_SIZE);
            kept.push(shm(size));
            continue;
        }
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
        let h = host(&source).map_err(|e| {
            Error::InvalidArgument(format!(
                "bind mount source {} (for {dest}): {e}",
                source.display()
            ))
        })?;
        let is_dir = match h.kind {
            SourceKind::MemoryDir => {
                // A guest tmpfs, shared by the pod: memory stays in the VM, as it would in
                // the container's own memory under runc.
                let path = ephemeral_dir(&source);
                m["source"] = Value::String(path.clone());
                if !ephemeral.iter().any(|e| e.path == path) {
                    ephemeral.push(Ephemeral {
                        path,
                        size: h.tmpfs_size.unwrap_or(0),
                    });
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
                    if h.kind == SourceKind::Socket {
                        "unix socket"
                    } else {
                        "fifo"
                    }
                )));
            }
        };
        let bind = Bind {
            inode: h.inode,
            is_dir,
            recursive: m["type"] == "rbind" || options(&m).any(|o| o == "rbind"),
            readonly: options(&m).any(|o| o == "ro" || o == "rro"),
            recursive_readonly: options(&m).any(|o| o == "rro"),
            mount: kept.len(),
            source,
        };
        if copyable(&dest, &bind.source, &h, bind.readonly) {
            let name = name_for(&bind.source);
            m["source"] = Value::String(format!("{FILES_DIR}/{name}"));
            let back = copied_back(&bind.source, &h, bind.readonly);
            copies.push(Copy { name, bind, back });
        } else {
            binds.push(bind);
        }
        kept.push(m);
    }
    *mounts = kept;
    Ok(Plan {
        spec,
        binds,
        ephemeral,
        copies,
        submounts: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_DIR: &str = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache";

    fn host(p: &Path) -> std::io::Result<HostPath> {
        let (kind, tmpfs_size) = match p.to_str().unwrap_or("") {
            "/data" | "/var/lib/kubelet/pods/u/volumes/cm" => (SourceKind::Dir, None),
            "/etc/hosts-of-pod" => (SourceKind::File, None),
            "/run/app.sock" => (SourceKind::Socket, None),
            "/run/fifo" => (SourceKind::Fifo, None),
            "/mnt/disk" => (SourceKind::Device, None),
            "/run/containerd/sb/shm" => (SourceKind::Dir, Some(16 << 20)),
            EMPTY_DIR => (SourceKind::MemoryDir, Some(8 << 20)),
            _ => return Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        Ok(HostPath {
            kind,
            inode: (1, p.as_os_str().len() as u64),
            tmpfs_size,
            size: 100,
        })
    }

    fn spec(mounts: Value) -> Value {
        serde_json::json!({"mounts": mounts})
    }

    #[test]
    fn host_binds_are_planned_in_order_with_their_mount() {
        let s = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts-of-pod",
             "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/host-proc", "type": "bind", "source": "/proc/1", "options": ["rbind"]},
            {"destination": "/data", "source": "/data", "options": ["rbind", "rw"]},
            {"destination": "/cm", "type": "none", "source": "/var/lib/kubelet/pods/u/volumes/cm",
             "options": ["bind"]},
        ]));
        let p = plan(&s, "c1", host).unwrap();
        let m = p.spec["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 4, "/proc/1 skipped: {m:?}");
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(
            m[1]["options"],
            serde_json::json!(["rbind", "rprivate", "ro"])
        );
        let inode = |s: &str| (1, s.len() as u64);
        assert_eq!(
            p.binds,
            vec![
                Bind {
                    source: "/data".into(),
                    inode: inode("/data"),
                    is_dir: true,
                    recursive: true,
                    readonly: false,
                    recursive_readonly: false,
                    mount: 2,
                },
                Bind {
                    source: "/var/lib/kubelet/pods/u/volumes/cm".into(),
                    inode: inode("/var/lib/kubelet/pods/u/volumes/cm"),
                    is_dir: true,
                    recursive: false,
                    readonly: false,
                    recursive_readonly: false,
                    mount: 3,
                },
            ]
        );
        for b in &p.binds {
            assert_eq!(m[b.mount]["source"], b.source.to_str().unwrap());
        }
        // The pod's small file is copied into the guest; its bind is kept for a fallback.
        let c = &p.copies[..];
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].bind.source, Path::new("/etc/hosts-of-pod"));
        assert_eq!((c[0].bind.mount, c[0].bind.readonly), (1, true));
        assert_eq!(m[1]["source"], format!("{FILES_DIR}/{}", c[0].name));
    }

    #[test]
    fn recursive_read_only_is_read_only_on_the_host_too_and_kept_for_the_guest() {
        // What containerd's CRI writes for `recursiveReadOnly: Enabled`.
        let s = spec(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": "/data",
             "options": ["rbind", "rprivate", "rro"]},
        ]));
        let p = plan(&s, "c1", host).unwrap();
        assert!(p.binds[0].readonly && p.binds[0].recursive_readonly && p.binds[0].recursive);
        assert_eq!(
            p.spec["mounts"][0]["options"],
            serde_json::json!(["rbind", "rprivate", "rro"]),
            "the guest applies rro itself"
        );
    }

    #[test]
    fn a_memory_empty_dir_becomes_one_guest_tmpfs_of_its_size_for_the_pod() {
        let s = spec(serde_json::json!([
            {"destination": "/cache", "type": "bind", "source": EMPTY_DIR, "options": ["rbind"]},
            {"destination": "/cache2", "type": "bind", "source": EMPTY_DIR, "options": ["rbind"]},
        ]));
        let p = plan(&s, "c1", host).unwrap();
        assert!(p.binds.is_empty());
        assert_eq!(p.ephemeral.len(), 1);
        let e = &p.ephemeral[0];
        assert!(e.path.starts_with(EPHEMERAL_DIR));
        assert!(!e.path[EPHEMERAL_DIR.len() + 1..].contains('/'));
        assert_eq!(e.size, 8 << 20);
        let m = p.spec["mounts"].as_array().unwrap();
        assert_eq!(m[0]["source"], e.path.as_str());
        assert_eq!(m[1]["source"], e.path.as_str());
    }

    #[test]
    fn dev_shm_becomes_a_guest_tmpfs_of_the_host_size() {
        for (src, size) in [
            ("/run/containerd/sb/shm", 16 << 20),
            ("/data", DEFAULT_SHM_SIZE),
            ("/gone", DEFAULT_SHM_SIZE),
        ] {
            let s = spec(serde_json::json!([
                {"destination": "/dev/shm", "type": "bind", "source": src,
                 "options": ["rbind", "ro"]},
            ]));
            let p = plan(&s, "c1", host).unwrap();
            assert!(p.binds.is_empty());
            let m = &p.spec["mounts"][0];
            assert_eq!(m["type"], "tmpfs", "{src}");
            assert!(
                options(m).any(|o| o == format!("size={size}")),
                "{src}: {m}"
            );
        }
        // A tmpfs /dev/shm (ctr's default spec) stays as it is.
        let s = spec(serde_json::json!([
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["size=65536k"]},
        ]));
        assert_eq!(plan(&s, "c1", host).unwrap().spec, s);
    }

    #[test]
    fn what_cannot_cross_is_skipped_or_refused_by_name() {
        let skipped = spec(serde_json::json!([
            {"destination": "/host-proc", "type": "bind", "source": "/proc/1", "options": ["rbind"]},
            {"destination": "/disk", "type": "bind", "source": "/mnt/disk", "options": ["bind"]},
        ]));
        let p = plan(&skipped, "c1", host).unwrap();
        assert!(p.binds.is_empty());
        assert_eq!(p.spec["mounts"], serde_json::json!([]));

        for (src, says) in [
            ("/nope", "/nope"),
            ("/run/app.sock", "unix socket"),
            ("/run/fifo", "fifo"),
            ("relative", "absolute"),
        ] {
            let s = spec(serde_json::json!([
                {"destination": "/x", "type": "bind", "source": src, "options": ["bind"]}
            ]));
            let e = plan(&s, "c1", host).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("/x"), "{src}: {e}");
        }
    }
}
