//! The per-VM vhost-device-vsock, run as a user of its own with no capabilities.
//!
//! The daemon handles the guest's vsock virtqueues, so a bug in it is reachable from a hostile
//! guest; it needs no privilege at all, only its two sockets. It gets a directory of its own,
//! `<run_dir>/vsock/`, owned by a random unprivileged id, and starts there: the run dir above
//! is root's (0700), so the daemon reaches its sockets by relative paths from its working
//! directory, which root set before `setpriv` dropped to that id. Root (QEMU while it sets up,
//! the shim) reaches them by full path.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::run_dir::RunDir;

/// The daemon's directory in the run dir.
const DIR: &str = "vsock";
/// The hybrid vsock socket the host connects to (`CONNECT <port>`), in [`DIR`]. Short names:
/// the host listens on `<UDS>_<port>` for the guest's connections, and a socket path must fit
/// in sun_path (108 bytes) below a run dir that already holds a 64-character pod id.
const UDS: &str = "uds";
/// The vhost-user socket QEMU connects to, in [`DIR`].
const VHOST: &str = "vhost";

/// `<run_dir>/vsock/uds`.
pub(super) fn uds_path(dir: &RunDir) -> PathBuf {
    dir.path(DIR).join(UDS)
}

/// `<run_dir>/vsock/vhost`.
pub(super) fn vhost_path(dir: &RunDir) -> PathBuf {
    dir.path(DIR).join(VHOST)
}

/// `setpriv` from util-linux (an essential Debian package): drops to the daemon's id, clears
/// its groups, capabilities (also the bounding set) and sets no_new_privs before the exec.
fn setpriv() -> Result<PathBuf> {
    which::which("setpriv").map_err(|_| {
        Error::io(
            "find setpriv (util-linux), which starts vhost-device-vsock unprivileged",
            std::io::ErrorKind::NotFound.into(),
        )
    })
}

/// Starts vhost-device-vsock for a guest with context id `guest_cid`, as `id:id`.
pub(super) fn spawn(dir: &RunDir, bin: &Path, guest_cid: u32, id: u32) -> Result<Daemon> {
    use std::os::unix::fs::DirBuilderExt;
    let own = dir.path(DIR);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&own)
        .map_err(|e| Error::io(format!("create {}", own.display()), e))?;
    std::os::unix::fs::chown(&own, Some(id), Some(id))
        .map_err(|e| Error::io(format!("hand {} to uid {id}", own.display()), e))?;
    let mut v = Command::new(setpriv()?);
    v.args([
        "--reuid",
        &id.to_string(),
        "--regid",
        &id.to_string(),
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ])
    .arg(bin)
    .arg("--vm")
    .arg(format!(
        "guest-cid={guest_cid},uds-path={UDS},socket={VHOST}"
    ))
    .current_dir(&own);
    dir.spawn("vhost-device-vsock", v, None)
}
