//! The per-VM run directory (`<state_dir>/<sandbox-id>/`) and the files the driver keeps there.
//!
//! One type knows every file name, so that both backends put their sockets and logs in the same
//! places, a dead VMM is explained from its own log and the console alike, and cleanup removes
//! exactly the driver's files and never the caller's.

use std::path::{Path, PathBuf};

use crate::daemon::tail_lines;
use crate::error::{Error, Result};

/// The per-VM directory and the files the driver puts in it.
#[derive(Debug)]
pub(crate) struct RunDir {
    root: PathBuf,
    created_root: bool,
}

impl RunDir {
    pub(crate) fn create(root: &Path) -> Result<RunDir> {
        let created_root = !root.exists();
        std::fs::create_dir_all(root.join("shared"))
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        Ok(RunDir {
            root: root.to_owned(),
            created_root,
        })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub(crate) fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    pub(crate) fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// The VMM exited on its own: its own output first (bad flags, KVM errors, unreadable
    /// files), then the guest console.
    pub(crate) fn vm_exited(&self, vmm_log: &str, status: String) -> Error {
        let own = tail_lines(&self.path(vmm_log), 10);
        let console = tail_lines(&self.console_log(), 20);
        let console_tail = match (own.trim().is_empty(), console.trim().is_empty()) {
            (true, _) => console,
            (false, true) => own,
            (false, false) => format!("{own}\n--- console ---\n{console}"),
        };
        Error::VmExited {
            status,
            console_tail,
        }
    }

    /// Removes the driver's files. The shared dir and the root go only if empty: whatever
    /// else is there (container rootfs mounts, state) belongs to the caller.
    pub(crate) fn remove(&self) -> Result<()> {
        for name in [
            "qmp.sock",
            "vsock.sock",
            "vhost-vsock.sock",
            "virtiofsd.sock",
            "virtiofsd.sock.pid",
            "console.log",
            "qemu.log",
            "ch-api.sock",
            "ch-api.sock.lock",
            "cloud-hypervisor.log",
            "virtiofsd.log",
            "vhost-device-vsock.log",
        ] {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("remove {}", self.path(name).display()),
                        e,
                    ))
                }
            }
        }
        // vhost-device-vsock creates "<uds-path>_<port>" sockets for guest-initiated connections.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vsock.sock_") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(self.shared());
        if self.created_root {
            let _ = std::fs::remove_dir(&self.root);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_keeps_foreign_files() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("sb");
        let d = RunDir::create(&root).unwrap();
        std::fs::write(d.path("console.log"), "x").unwrap();
        std::fs::write(d.path("vsock.sock_1025"), "").unwrap();
        std::fs::write(d.path("state.json"), "{}").unwrap();
        d.remove().unwrap();
        assert!(!d.path("console.log").exists() && !d.path("vsock.sock_1025").exists());
        assert!(d.path("state.json").exists() && !d.shared().exists());
        std::fs::remove_file(d.path("state.json")).unwrap();
        d.remove().unwrap();
        assert!(!root.exists());
    }
}
