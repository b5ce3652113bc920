//! A shim's ttrpc socket: the file behind its address, whether a shim still serves it, and
//! removing it once nobody does (`shim delete`, the pod's guard).

use std::path::Path;

/// The file behind a shim socket address (`unix:///run/containerd/s/<hash>`).
pub fn socket_file(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// Whether a shim serves on `address`.
fn shim_alive(address: &str) -> bool {
    !address.is_empty() && std::os::unix::net::UnixStream::connect(socket_file(address)).is_ok()
}

/// Removes a shim socket that nothing listens on any more; says whether a live shim still
/// serves it (then it stays). The containerd-shim library removes it at exit only through the
/// `address` file of the bundle it was started in, and never after a crash.
pub fn remove_dead_socket(address: &str) -> bool {
    let path = socket_file(address);
    if address.is_empty() || !path.exists() {
        return false;
    }
    if shim_alive(address) {
        return true; // a live shim (another container of the pod) still serves it
    }
    match std::fs::remove_file(path) {
        Ok(()) => log::debug!("removed shim socket {}", path.display()),
        Err(e) => log::warn!("cannot remove shim socket {}: {e}", path.display()),
    }
    false
}
