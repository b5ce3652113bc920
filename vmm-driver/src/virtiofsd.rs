//! The per-VM virtiofsd that shares the run directory's `shared/` with the guest.
//!
//! Both backends start it the same way and give the guest the same tag, which the agent mounts;
//! only how the hypervisor attaches to its socket differs per backend.
//!
//! virtiofsd always runs sandboxed (`Config::virtiofsd_sandbox`): the guest is treated as
//! hostile, and its FUSE requests must not reach anything outside the share.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::daemon::Daemon;
use crate::error::Result;
use crate::run_dir::RunDir;

/// virtiofsd's name among a VM's processes (`Vmm::pids`): the pod's volumes are bound in its
/// mount namespace.
pub const VIRTIOFSD: &str = "virtiofsd";

/// The virtio-fs tag the agent mounts.
pub const VIRTIOFS_TAG: &str = "cocoon";

/// Starts the per-VM virtiofsd that serves the run directory's `shared/`; returns it and the
/// vhost-user socket it will create (wait for it with `daemon::wait_for_socket`).
pub(crate) fn spawn_virtiofsd(cfg: &Config, dir: &RunDir, bin: &Path) -> Result<(Daemon, PathBuf)> {
    let sock = dir.path("virtiofsd.sock");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", dir.shared().display()))
        .arg(format!("--cache={}", cfg.virtiofs_cache.as_arg()))
        .arg(format!("--sandbox={}", cfg.virtiofsd_sandbox.as_arg()))
        // A mount below an exported directory (a volume's own submount) is a mount in the
        // guest too, with its own flags, instead of part of one filesystem.
        .arg("--announce-submounts");
    let d = dir.spawn(VIRTIOFSD, cmd, None)?;
    Ok((d, sock))
}
