//! The node itself: whether Cocoon can run there, and restarting its containerd through the
//! node's own init, as kata-deploy does (`systemctl restart containerd` in the node's mount
//! namespace). Running pods survive it: their shims outlive containerd and it finds them again
//! (docs/conformance.md, "containerd restarts").

use crate::{Error, Node, Result};

/// Where a node's containerd may be.
const CONTAINERD_BINS: [&str; 3] = [
    "/usr/bin/containerd",
    "/usr/local/bin/containerd",
    "/usr/sbin/containerd",
];

/// Refuses a node Cocoon can't serve: another architecture than the image's, or no
/// containerd.
pub fn check(node: &Node) -> Result<()> {
    let machine = nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_default();
    if machine != std::env::consts::ARCH {
        return Err(Error::Unsupported(format!(
            "the node is {machine}, and this image carries {} binaries",
            std::env::consts::ARCH
        )));
    }
    let found = CONTAINERD_BINS.iter().any(|b| node.path(b).is_file())
        || node.path("/etc/containerd").is_dir();
    if !found {
        return Err(Error::Unsupported(format!(
            "no containerd (looked for {} and /etc/containerd under {})",
            CONTAINERD_BINS.join(", "),
            node.root().display()
        )));
    }
    Ok(())
}

/// The argument that selects [`restart_in_init_namespace`] in this binary.
pub const RESTART_ARG: &str = "restart-containerd";

/// Restarts the node's containerd through the node's init, as kata-deploy does: a child of
/// this binary enters the mount namespace of PID 1 (the node's systemd: the DaemonSet runs
/// with `hostPID`) and becomes the node's `systemctl restart containerd`. Not a chroot:
/// systemctl ignores requests from inside one.
pub fn restart_containerd() -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::Node(format!("this binary: {e}")))?;
    let out = std::process::Command::new(exe)
        .arg(RESTART_ARG)
        .output()
        .map_err(|e| Error::Node(format!("run the restart: {e}")))?;
    if !out.status.success() {
        return Err(Error::Node(format!(
            "restarting containerd failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The child's side; returns only on failure. Single-threaded, as `setns` into a mount
/// namespace needs.
pub fn restart_in_init_namespace() -> Error {
    use std::os::unix::process::CommandExt;
    let ns = match std::fs::File::open("/proc/1/ns/mnt") {
        Ok(f) => f,
        Err(e) => return Error::Node(format!("open /proc/1/ns/mnt (is hostPID set?): {e}")),
    };
    if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS) {
        return Error::Node(format!("enter the node's mount namespace: {e}"));
    }
    let e = std::process::Command::new("systemctl")
        .args(["restart", "containerd"])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .current_dir("/")
        .exec();
    Error::Node(format!("run the node's systemctl: {e}"))
}
