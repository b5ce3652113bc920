//! Writes an initramfs: a cpio archive in the "newc" format the kernel unpacks.
//!
//! The archive is built from a list of entries rather than a staging directory, so device
//! nodes and ownership come out right without root privileges or mknod.

use std::collections::BTreeSet;
use std::io::Write;

use cpio::newc::{Builder, ModeFileType};

use crate::{Error, Result};

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    CharDev { major: u32, minor: u32 },
    Symlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    mode: u32,
    kind: Kind,
}

/// An initramfs under construction. Parent directories are added implicitly.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
    dirs: BTreeSet<String>,
}

fn clean(path: &str) -> Result<String> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(Error::BadEntry {
            name: path.to_owned(),
            message: "must be a normal relative path".into(),
        });
    }
    Ok(p.to_owned())
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            if self.dirs.insert(acc.clone()) {
                self.entries.push(Entry {
                    path: acc.clone(),
                    mode: 0o755,
                    kind: Kind::Dir,
                });
            }
        }
    }

    fn add(&mut self, path: &str, mode: u32, kind: Kind) -> Result<&mut Self> {
        let path = clean(path)?;
        self.parents(&path);
        if matches!(kind, Kind::Dir) && !self.dirs.insert(path.clone()) {
            return Ok(self);
        }
        self.entries.push(Entry { path, mode, kind });
        Ok(self)
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        self.add(path, mode, Kind::Dir)
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<&mut Self> {
        self.add(path, mode, Kind::File(data))
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<&mut Self> {
        self.add(path, mode, Kind::CharDev { major, minor })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        self.add(path, 0o777, Kind::Symlink(target.to_owned()))
    }

    /// Writes the archive, owned by root, with a fixed mtime so builds are reproducible.
    pub fn write<W: Write>(&self, mut out: W) -> Result<W> {
        for (i, e) in self.entries.iter().enumerate() {
            let (ty, data): (ModeFileType, &[u8]) = match &e.kind {
                Kind::Dir => (ModeFileType::Directory, &[]),
                Kind::File(d) => (ModeFileType::Regular, d),
                Kind::CharDev { .. } => (ModeFileType::Char, &[]),
                Kind::Symlink(t) => (ModeFileType::Symlink, t.as_bytes()),
            };
            let size = u32::try_from(data.len()).map_err(|_| Error::BadEntry {
                name: e.path.clone(),
                message: "larger than 4 GiB".into(),
            })?;
            let mut b = Builder::new(&e.path)
                .ino(u32::try_from(i + 1).unwrap_or(u32::MAX))
                .mode(e.mode & 0o7777)
                .set_mode_file_type(ty)
                .uid(0)
                .gid(0)
                .nlink(if matches!(e.kind, Kind::Dir) { 2 } else { 1 })
                .mtime(0);
            if let Kind::CharDev { major, minor } = e.kind {
                b = b.rdev_major(major).rdev_minor(minor);
            }
            let mut w = b.write(out, size);
            w.write_all(data)?;
            out = w.finish()?;
        }
        Ok(cpio::newc::trailer(out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::newc::Reader;

    fn read_all(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut out = vec![];
        loop {
            let mut r = Reader::new(bytes).unwrap();
            if r.entry().is_trailer() {
                return out;
            }
            let e = r.entry();
            let (name, mode, rmaj, rmin) = (
                e.name().to_owned(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            );
            let mut data = vec![];
            std::io::Read::read_to_end(&mut r, &mut data).unwrap();
            out.push((name, mode, data, rmaj, rmin));
            bytes = r.finish().unwrap();
        }
    }

    #[test]
    fn writes_a_readable_newc_archive_with_parents() {
        let mut i = Initramfs::new();
        i.file("/init", 0o755, b"#!agent".to_vec()).unwrap();
        i.file(
            "lib/modules/6.1/kernel/fs/fuse/fuse.ko",
            0o644,
            vec![1, 2, 3],
        )
        .unwrap();
        i.char_dev("dev/console", 0o600, 5, 1).unwrap();
        i.dir("dev", 0o755).unwrap();
        i.symlink("bin/sh", "busybox").unwrap();
        let bytes = i.write(Vec::new()).unwrap();
        let entries = read_all(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/fs",
                "lib/modules/6.1/kernel/fs/fuse",
                "lib/modules/6.1/kernel/fs/fuse/fuse.ko",
                "dev",
                "dev/console",
                "bin",
                "bin/sh"
            ]
        );
        let init = &entries[0];
        assert_eq!(init.1, 0o100755);
        assert_eq!(init.2, b"#!agent");
        let console = entries.iter().find(|e| e.0 == "dev/console").unwrap();
        assert_eq!((console.1, console.3, console.4), (0o020600, 5, 1));
        let sh = entries.iter().find(|e| e.0 == "bin/sh").unwrap();
        assert_eq!(
            (sh.1 & 0o170000, sh.2.as_slice()),
            (0o120000, b"busybox".as_slice())
        );
    }

    #[test]
    fn refuses_escaping_paths() {
        let mut i = Initramfs::new();
        assert!(i.file("../etc/passwd", 0o644, vec![]).is_err());
        assert!(i.file("/", 0o644, vec![]).is_err());
    }
}
