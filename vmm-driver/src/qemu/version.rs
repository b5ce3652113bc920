//! Which QEMU release runs the VMs: the command line and what a pod can do depend on it.
//!
//! Debian 12 ships QEMU 7.2 and bookworm-backports QEMU 10; Cocoon runs on both. Two things
//! differ: 10.0 dropped `-runas` for `-run-with user=` (9.1), and only 8.2 and later can map a
//! file that QEMU opened read-only as private, writable guest RAM (`memory-backend-file`'s
//! `rom=off`), which is what lets clones share a template's RAM without any of them being able
//! to write the template (`restore.rs`).
//!
//! Asking QEMU (`-version`) takes ~16 ms, once per pod; the answer is kept in the template dir
//! (a cache that outlives pods, as the templates do; none without one) under the binary's path
//! and fingerprint, so only the first pods after an upgrade ask.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A QEMU release, as `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
}

impl QemuVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        QemuVersion { major, minor }
    }

    /// From `qemu-system-x86_64 -version`'s first line ("QEMU emulator version 10.0.2 (…)").
    pub fn parse(text: &str) -> Option<Self> {
        let v = text
            .lines()
            .next()?
            .split("version ")
            .nth(1)?
            .split_whitespace()
            .next()?;
        let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
        Some(QemuVersion::new(parts.next()??, parts.next()??))
    }

    /// Whether the unprivileged user is named with `-run-with user=` (9.1 on; 10.0 has no
    /// `-runas`).
    pub fn has_run_with_user(self) -> bool {
        self >= QemuVersion::new(9, 1)
    }

    /// Whether a RAM file opened read-only can be guest RAM that the guest writes (privately):
    /// `memory-backend-file,readonly=on,rom=off`, 8.2 on. Before it, `readonly=on` made the
    /// RAM a ROM, and a writable private mapping needed the file opened read-write.
    pub fn maps_read_only_ram_private(self) -> bool {
        self >= QemuVersion::new(8, 2)
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Size, mtime and inode: what changes when a file is replaced (`make image`, a QEMU upgrade).
/// Names a template's inputs (`template.rs`) and a QEMU binary here.
pub(crate) fn fingerprint(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{} {}.{} {}", m.size(), m.mtime(), m.mtime_nsec(), m.ino()),
        Err(_) => "missing".into(),
    }
}

/// The release of the QEMU at `qemu`, asked once per binary and kept under `cache_dir`.
pub async fn probe(qemu: &Path, cache_dir: &Path) -> Result<QemuVersion> {
    let key = format!("{} {}", qemu.display(), fingerprint(qemu));
    let name: String = Sha256::digest(key.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let cached = cache_dir.join(format!("qemu-version-{name}"));
    if let Some(v) = std::fs::read_to_string(&cached)
        .ok()
        .and_then(|t| QemuVersion::parse(&t))
    {
        return Ok(v);
    }
    let out = tokio::process::Command::new(qemu)
        .arg("-version")
        .output()
        .await
        .map_err(|e| Error::io(format!("run {} -version", qemu.display()), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = QemuVersion::parse(&text).ok_or_else(|| Error::ConfigValue {
        key: "paths.qemu",
        message: format!(
            "{} -version said {:?}: not a QEMU this can use",
            qemu.display(),
            text.trim()
        ),
    })?;
    // Written whole and renamed, so that a pod starting beside this one reads all or nothing.
    let tmp = cache_dir.join(format!(".qemu-version-{name}.{}", std::process::id()));
    // Only into a template dir that exists: with `template = "off"` there is none to make.
    if cache_dir.is_dir() && std::fs::write(&tmp, text.as_bytes()).is_ok() {
        let _ = std::fs::rename(&tmp, &cached);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debians_releases_parse_and_their_features_follow() {
        let old = QemuVersion::parse(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
        )
        .unwrap();
        let new =
            QemuVersion::parse("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\n").unwrap();
        assert_eq!(
            (old, new),
            (QemuVersion::new(7, 2), QemuVersion::new(10, 0))
        );
        assert!(!old.has_run_with_user() && new.has_run_with_user());
        assert!(!old.maps_read_only_ram_private() && new.maps_read_only_ram_private());
        assert!(QemuVersion::new(8, 2).maps_read_only_ram_private());
        assert_eq!(QemuVersion::parse("cloud-hypervisor v40"), None);
    }
}
