//! A network namespace the shim makes for a pod whose spec asks for a new one without naming
//! it (Docker, `ctr run`), where CRI would have made one with CNI. The VMM starts in it, and
//! the shim reports the VMM's pid, so that Docker, which wires a container's network into
//! `/proc/<pid>/ns/net` after Create, wires it into this namespace; the shim hands the guest
//! what appeared at Start (`late.rs`).
//!
//! The namespace is bind-mounted on `<state_dir>/<sandbox>.netns`, beside the run dir and
//! derived from it, so that `shim delete` after a crash finds it without any record.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::{Error, Result};

/// The pod netns the shim owns: removed with [`OwnNetns::remove`].
#[derive(Debug)]
pub struct OwnNetns {
    path: PathBuf,
}

/// Where the netns of the sandbox whose run dir is `run_dir` is bound.
pub fn path_for(run_dir: &Path) -> PathBuf {
    let mut p = run_dir.as_os_str().to_owned();
    p.push(".netns");
    PathBuf::from(p)
}

impl OwnNetns {
    /// Makes a fresh network namespace and binds it at `path`. `unshare` moves only the
    /// calling thread, so it happens on a thread of its own, which then ends.
    pub fn create(path: &Path) -> Result<OwnNetns> {
        let fail = |message: String| Error::Netns {
            path: path.to_owned(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| fail(format!("create the mount point: {e}")))?;
        let target = path.to_owned();
        let made = std::thread::Builder::new()
            .name("pod-netns-new".into())
            .spawn(move || {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("unshare a network namespace: {e}"))?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| format!("bind the new network namespace: {e}"))
            })
            .map_err(|e| fail(e.to_string()))?
            .join()
            .unwrap_or_else(|_| Err("the thread panicked".into()));
        if let Err(m) = made {
            let _ = std::fs::remove_file(path);
            return Err(fail(m));
        }
        Ok(OwnNetns {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unbinds and removes the namespace; it is gone once nothing else holds it.
    pub fn remove(self) {
        remove_at(&self.path);
    }
}

/// Removes a pod netns bound at `path`, if any (also after a crash: nothing is followed).
pub fn remove_at(path: &Path) {
    let _ = nix::mount::umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
    let is_file = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    if is_file {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netns_is_bound_beside_the_run_dir() {
        assert_eq!(
            path_for(Path::new("/run/cocoon/a.b")),
            Path::new("/run/cocoon/a.b.netns")
        );
    }

    #[test]
    fn a_netns_is_made_bound_and_removed() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to make a network namespace");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sb.netns");
        let ns = OwnNetns::create(&p).unwrap();
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        let made = std::fs::metadata(ns.path()).unwrap();
        let host = std::fs::metadata("/proc/self/ns/net").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            made.ino(),
            host.ino(),
            "a new namespace, not the host's ({mine:?})"
        );
        assert!(OwnNetns::create(&p).is_err(), "never over an existing one");
        ns.remove();
        assert!(!p.exists());
    }
}
