//! Image layers as read-only EROFS images, built once and cached for every pod (issue #29: a
//! container's root filesystem off virtio-fs).
//!
//! A layer is one of containerd's committed snapshot directories (the overlay snapshotter's
//! `snapshots/<n>/fs`, a `lowerdir` of a container's rootfs mount): immutable while any
//! snapshot uses it. Its image lives in a root-only directory (`<cache>/<key>.erofs`) beside
//! a record of what it was built from and its checksum (`<key>.json`). The key is a digest of
//! the layer's identity: its path, device, inode and change time, so a directory removed and
//! made again under the same name (a containerd root wiped and refilled) is another layer.
//!
//! Every use checks the image before a VM gets it: the record must name this layer, the
//! superblock must be sound and the file as long as it says, and the whole file must have the
//! recorded crc32c (a truncated, corrupted or half-written image is rebuilt, with a log line).
//! Builds go to a temporary file that is checked and then renamed into place, under a per-key
//! lock, so two pods of one image build it once and a crash never leaves a partial image under
//! the final name. An image a running VM holds open stays valid when it is replaced or
//! collected: the VM keeps its open file.

mod erofs;
mod scratch;
pub use scratch::ScratchMaker;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use erofs::{check_superblock, Superblock, Unsupported};

use crate::{Error, Result};

/// Runs a program to its end: its exit code and stderr, or why it could not be run. Inside
/// the shim, a child's status may be taken by the shim library's reaper, so the shim's runner
/// asks it (`crate::child`); [`plain_runner`] waits by itself.
pub type Runner = std::sync::Arc<
    dyn Fn(std::process::Command) -> std::result::Result<(i32, String), String> + Send + Sync,
>;

/// A runner that waits for the program itself: for processes that reap no children of others.
pub fn plain_runner() -> Runner {
    std::sync::Arc::new(|mut cmd: std::process::Command| {
        let out = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| e.to_string())?;
        let code = out.status.code().unwrap_or(128);
        Ok((code, String::from_utf8_lossy(&out.stderr).into_owned()))
    })
}

/// Makes `dir` (and its parents) if missing, and `0700` whatever it was: the layer cache and
/// the scratch disks' directory are root's only.
fn root_only_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))
}

/// The disks a container's rootfs uses in its VM (`crate::pod`'s layer rootfs), to release
/// at delete: the images it shares with the pod's other containers, and its scratch disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerUse {
    pub images: Vec<PathBuf>,
    /// Its scratch disk's LUN.
    pub scratch: Option<u32>,
}

/// The layer cache: a root-only directory of images.
#[derive(Clone)]
pub struct LayerCache {
    dir: PathBuf,
    mkfs: PathBuf,
    run: Runner,
}

impl std::fmt::Debug for LayerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerCache")
            .field("dir", &self.dir)
            .field("mkfs", &self.mkfs)
            .finish_non_exhaustive()
    }
}

/// What identifies a layer directory for the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    source: PathBuf,
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Identity {
    fn of(layer: &Path) -> std::io::Result<Identity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(layer)?;
        if !m.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
        Ok(Identity {
            source: layer.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }

    /// The cache key: hex of the first 16 bytes of a SHA-256 of the identity.
    fn key(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.source.as_os_str().as_encoded_bytes());
        for n in [self.dev, self.ino] {
            h.update(n.to_le_bytes());
        }
        for n in [self.ctime, self.ctime_nsec] {
            h.update(n.to_le_bytes());
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The record beside an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    layer: Identity,
    size: u64,
    crc32c: u32,
}

/// A checked image, ready to hand to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerImage {
    pub path: PathBuf,
    pub size: u64,
    /// Whether this call built it (a cold cache) rather than found it.
    pub built: bool,
}

impl LayerCache {
    /// The cache at `dir` (made `0700` if missing), building with the `mkfs.erofs` at `mkfs`.
    pub fn open(dir: &Path, mkfs: PathBuf) -> Result<LayerCache> {
        root_only_dir(dir)?;
        Ok(LayerCache {
            dir: dir.to_path_buf(),
            mkfs,
            run: plain_runner(),
        })
    }

    /// The same cache, running `mkfs.erofs` with `run`.
    pub fn with_runner(self, run: Runner) -> LayerCache {
        LayerCache { run, ..self }
    }

    /// The checked image of `layer`, built if there is none or the cached one is not sound.
    /// `Ok(Err(_))` is a layer erofs-utils can't image faithfully: its container keeps the
    /// shared filesystem. Blocking (mkfs can take seconds): call it off the async threads.
    pub fn image_for(&self, layer: &Path) -> Result<std::result::Result<LayerImage, Unsupported>> {
        let id =
            Identity::of(layer).map_err(|e| Error::io(format!("layer {}", layer.display()), e))?;
        let key = id.key();
        let image = self.dir.join(format!("{key}.erofs"));
        let record = self.dir.join(format!("{key}.json"));
        if let Ok(size) = self.sound(&image, &record, &id) {
            return Ok(Ok(LayerImage {
                path: image,
                size,
                built: false,
            }));
        }
        let lock = self.lock(&key)?;
        // Another pod may have built it while this one waited for the lock.
        match self.sound(&image, &record, &id) {
            Ok(size) => {
                return Ok(Ok(LayerImage {
                    path: image,
                    size,
                    built: false,
                }))
            }
            Err(why) if image.exists() => {
                log::warn!(
                    "layer image {} is not sound ({why}); building it again",
                    image.display()
                );
            }
            Err(_) => {}
        }
        let tmp = self.dir.join(format!("{key}.erofs.tmp"));
        let built = (|| {
            if let Err(u) = erofs::build(&self.mkfs, layer, &tmp, &self.run)? {
                return Ok(Err(u));
            }
            let io =
                |what: &str, e: std::io::Error| Error::io(format!("{what} {}", tmp.display()), e);
            let sb = check_superblock(&tmp)
                .map_err(|why| io("check the new image", std::io::Error::other(why)))?;
            let crc = erofs::file_crc(&tmp).map_err(|e| io("read", e))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("sync", e))?;
            let size = sb.blocks * sb.block_size;
            let rec = Record {
                layer: id.clone(),
                size,
                crc32c: crc,
            };
            write_atomically(
                &record,
                &serde_json::to_vec_pretty(&rec).unwrap_or_default(),
            )?;
            std::fs::rename(&tmp, &image).map_err(|e| io("rename", e))?;
            Ok(Ok(LayerImage {
                path: image.clone(),
                size,
                built: true,
            }))
        })();
        if !matches!(built, Ok(Ok(_))) {
            let _ = std::fs::remove_file(&tmp);
        }
        drop(lock);
        built
    }

    /// Removes every image whose layer is gone or changed (no snapshot uses it any more), and
    /// leftovers of interrupted builds; returns the images removed.
    pub fn collect(&self) -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("read {}", self.dir.display()), e))?;
        let mut removed = vec![];
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".erofs") else {
                // A record without its image, or a build's temporary file, while no build of
                // that key runs (it writes the record, then renames the image into place).
                let key = name
                    .strip_suffix(".json")
                    .filter(|k| !self.dir.join(format!("{k}.erofs")).exists())
                    .or_else(|| name.strip_suffix(".erofs.tmp"));
                if let Some(_idle) = key.and_then(|k| self.idle(k)) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            };
            let record = self.dir.join(format!("{key}.json"));
            let live = read_record(&record)
                .and_then(|r| {
                    Identity::of(&r.layer.source)
                        .ok()
                        .filter(|now| *now == r.layer)
                })
                .is_some();
            if !live {
                let Some(_idle) = self.idle(key) else {
                    continue;
                };
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&record);
                // No build can want this key again: its layer's identity is gone for good.
                let _ = std::fs::remove_file(self.dir.join(format!("{key}.lock")));
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Why the image at `image` can't be used for `id`, or its size.
    fn sound(
        &self,
        image: &Path,
        record: &Path,
        id: &Identity,
    ) -> std::result::Result<u64, String> {
        let rec = read_record(record).ok_or("no record")?;
        if rec.layer != *id {
            return Err("recorded for another layer".into());
        }
        let sb = check_superblock(image)?;
        if sb.blocks * sb.block_size != rec.size {
            return Err(format!(
                "{} bytes, recorded {}",
                sb.blocks * sb.block_size,
                rec.size
            ));
        }
        let crc = erofs::file_crc(image).map_err(|e| e.to_string())?;
        if crc != rec.crc32c {
            return Err(format!("crc32c {crc:08x}, recorded {:08x}", rec.crc32c));
        }
        Ok(rec.size)
    }

    fn lock(&self, key: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
        let path = self.dir.join(format!("{key}.lock"));
        let f = std::fs::File::create(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io(format!("lock {}", path.display()), e.into()))
    }

    /// `Some` while no build of `key` runs (holding its lock, if it has a lock file: a build
    /// makes that first), `None` while one does.
    fn idle(&self, key: &str) -> Option<Option<nix::fcntl::Flock<std::fs::File>>> {
        match std::fs::File::open(self.dir.join(format!("{key}.lock"))) {
            Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .ok()
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
            Err(_) => None,
        }
    }
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
mod tests;
