//! The per-VM run directory (`<state_dir>/<sandbox-id>/`) and the files the driver keeps there.
//!
//! One type knows every file name, so that both backends put their sockets and logs in the same
//! places, a dead VMM is explained from its own log and the console alike, and cleanup removes
//! exactly the driver's files and never the caller's.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cocoon_protocol::auth::{AgentKey, KEY_FILE};

use crate::daemon::{tail_lines, Daemon};
use crate::error::{Error, Result};

/// The driver's crash record in the run directory: one line per process it started, written
/// as each one starts, so that a caller killed in the middle of a boot leaves a list that its
/// cleanup can act on ([`recorded_processes`]).
const PIDS: &str = "pids";

/// A process the driver started for a VM, from its crash record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: u32,
    /// From `/proc/<pid>/stat` when it started ([`crate::daemon::start_time`]): a pid that
    /// was reused since names another process, with another start time.
    pub start: Option<u64>,
}

/// The processes the driver started for the VM whose run directory is `root`, whether or not
/// they still run. Empty if there is no record.
pub fn recorded_processes(root: &Path) -> Vec<Recorded> {
    std::fs::read_to_string(root.join(PIDS))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Recorded {
                name: f.next()?.to_owned(),
                pid: f.next()?.parse().ok()?,
                start: f.next().and_then(|s| s.parse().ok()),
            })
        })
        .collect()
}

/// The per-VM directory and the files the driver puts in it.
#[derive(Debug)]
pub(crate) struct RunDir {
    root: PathBuf,
    created_root: bool,
}

impl RunDir {
    pub(crate) fn create(root: &Path) -> Result<RunDir> {
        use std::os::unix::fs::DirBuilderExt;
        let created_root = !root.exists();
        // Sockets, logs and the share's host side: for root only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        // The VMM opens the console with O_CREAT, which keeps an existing file's mode.
        crate::daemon::private_file(&root.join("console.log"))?;
        crate::share::export(root)?;
        Ok(RunDir {
            root: root.to_owned(),
            created_root,
        })
    }

    /// The same directory for a part of the driver that starts helpers later
    /// (`qemu/late_share.rs`); removing the directory stays with its owner.
    pub(crate) fn handle(&self) -> RunDir {
        RunDir {
            root: self.root.clone(),
            created_root: false,
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Starts a helper or the VMM with its output in `<name>.log`, in the network namespace at
    /// `netns` if given, and adds it to the crash record before anything else happens.
    pub(crate) fn spawn(
        &self,
        name: &'static str,
        cmd: tokio::process::Command,
        netns: Option<&Path>,
    ) -> Result<Daemon> {
        let d = Daemon::spawn_in(name, cmd, &self.path(&format!("{name}.log")), netns)?;
        let start = crate::daemon::start_time(d.pid())
            .map(|s| s.to_string())
            .unwrap_or_default();
        let line = format!("{name} {} {start}\n", d.pid());
        let recorded = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.path(PIDS))
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        if let Err(e) = recorded {
            // Only crash cleanup depends on it; the VM itself is fine.
            log::warn!("recording {name} (pid {}) in {PIDS}: {e}", d.pid());
        }
        Ok(d)
    }

    /// Makes the pod's agent key and hands it to the guest: a 0400 file at the top of the
    /// host-only share directory, which the guest reads over virtio-fs
    /// (`cocoon_protocol::auth`). Nobody else on the host can read it (the run dir is 0700).
    pub(crate) fn hand_key(&self) -> Result<AgentKey> {
        write_key(&self.key_file())
    }

    /// Makes the pod's agent key as a 0400 file of the run dir, [`Self::fw_cfg_key_file`],
    /// which QEMU hands to the guest as a fw_cfg item: no share needed.
    pub(crate) fn hand_fw_cfg_key(&self) -> Result<AgentKey> {
        write_key(&self.fw_cfg_key_file())
    }

    pub(crate) fn fw_cfg_key_file(&self) -> PathBuf {
        self.root.join("agent-key")
    }

    fn key_file(&self) -> PathBuf {
        crate::share::host_dir(&self.root).join(KEY_FILE)
    }

    /// What virtiofsd exports (see `share`).
    pub(crate) fn shared(&self) -> PathBuf {
        crate::share::export_dir(&self.root)
    }

    pub(crate) fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// The guest's serial port: QEMU connects to it, Cloud Hypervisor listens on it
    /// (`console.rs` relays either into `console.log`).
    pub(crate) fn console_socket(&self) -> PathBuf {
        self.root.join("console.sock")
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

    /// Removes the driver's files and unexports the share. The share's directories and the
    /// root go only if empty: whatever else is there (container dirs, state) is the caller's.
    pub(crate) fn remove(&self) -> Result<()> {
        for name in [
            "qmp.sock",
            "vsock.sock",
            "vhost-vsock.sock",
            "virtiofsd.sock",
            "virtiofsd.sock.pid",
            "console.log",
            "console.log.1",
            "console.sock",
            "qemu.log",
            "qemu-template.log",
            "tcons.sock",
            "tqmp.sock",
            // The serial channel's, a pod's and a template build's (`qemu/mod.rs`).
            "agent.sock",
            "tagent.sock",
            "ch-api.sock",
            "ch-api.sock.lock",
            "cloud-hypervisor.log",
            "virtiofsd.log",
            "vhost-device-vsock.log",
            PIDS,
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
        for key in [self.key_file(), self.fw_cfg_key_file()] {
            match std::fs::remove_file(&key) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("remove {}", key.display()), e)),
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
        // vhost-device-vsock's own directory (`qemu/vsockd.rs`). Its owner is a process the
        // guest can reach; remove_dir_all unlinks what is there and follows no symlink.
        match std::fs::remove_dir_all(self.path("vsock")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("remove {}", self.path("vsock").display()),
                    e,
                ))
            }
        }
        crate::share::unexport(&self.root);
        if self.created_root {
            let _ = std::fs::remove_dir(&self.root);
        }
        Ok(())
    }
}

/// Writes a fresh agent key to `path`, 0400, replacing what was there.
fn write_key(path: &Path) -> Result<AgentKey> {
    let key = AgentKey::generate().map_err(|e| Error::io("make the agent key", e))?;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, key.as_bytes()))
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_keeps_foreign_files() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("sb");
        let d = RunDir::create(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&d.console_log()), 0o600);
        std::fs::write(d.path("console.log"), "x").unwrap();
        std::fs::write(d.path("vsock.sock_1025"), "").unwrap();
        std::fs::write(d.path("state.json"), "{}").unwrap();
        d.remove().unwrap();
        assert!(!d.path("console.log").exists() && !d.path("vsock.sock_1025").exists());
        assert!(d.path("state.json").exists() && !d.shared().exists());
        assert!(!crate::share::host_dir(&root).exists());
        std::fs::remove_file(d.path("state.json")).unwrap();
        d.remove().unwrap();
        assert!(!root.exists());
    }

    /// Each spawned process is in the record the moment `spawn` returns, with the start time
    /// that tells it apart from a later process with the same pid; remove drops the record.
    #[tokio::test]
    async fn every_spawned_process_is_recorded_at_once() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("sb");
        let d = RunDir::create(&root).unwrap();
        assert!(recorded_processes(&root).is_empty());
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        let mut sleeper = d.spawn("virtiofsd", cmd, None).unwrap();
        let rec = recorded_processes(&root);
        assert_eq!(rec.len(), 1);
        assert_eq!(
            (rec[0].name.as_str(), rec[0].pid),
            ("virtiofsd", sleeper.pid())
        );
        assert_eq!(rec[0].start, crate::daemon::start_time(sleeper.pid()));
        assert!(rec[0].start.is_some());
        sleeper
            .stop(std::time::Duration::from_secs(1))
            .await
            .unwrap();
        d.remove().unwrap();
        assert!(recorded_processes(&root).is_empty());
        assert!(!root.exists());
    }
}
