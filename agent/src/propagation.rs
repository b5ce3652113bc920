//! The propagation a mount entry asks for (`rshared`, `rslave`, `rprivate`, …), applied after
//! libcontainer made the container's mounts.
//!
//! CRI writes one on every volume (`rprivate` for None, `rslave` for HostToContainer,
//! `rshared` for Bidirectional), and runc applies it to the mount. libcontainer 0.7 parses
//! these options as flags to clear and applies none, so a volume bind would keep the
//! propagation of its source: the guest's mounts are shared (`init::switch_root`), and a
//! container's private volume would then share mounts with the pod's other containers. So
//! the runner, once the container exists and before it starts, enters its mount namespace and
//! sets each entry's propagation on its destination, as runc does.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use oci_spec::runtime::Spec;

/// The propagation flags of one mount option, `None` for any other option.
fn flags_of(option: &str) -> Option<MsFlags> {
    let rec = MsFlags::MS_REC;
    Some(match option {
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | rec,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | rec,
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | rec,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | rec,
        _ => return None,
    })
}

/// Each mount destination with the propagation changes its options ask for, in order.
pub fn requested(spec: &Spec) -> Vec<(PathBuf, MsFlags)> {
    let mut out = vec![];
    for m in spec.mounts().iter().flatten() {
        for o in m.options().iter().flatten() {
            if let Some(f) = flags_of(o) {
                out.push((m.destination().clone(), f));
            }
        }
    }
    out
}

/// Applies `wanted` in the mount namespace of the container whose init is `pid`, then returns
/// to the runner's own namespace, root and working directory (its result file and the
/// container's state are paths there). Only for the single-threaded runner: `setns` into a
/// mount namespace needs a process of one thread.
pub fn apply(pid: i32, wanted: &[(PathBuf, MsFlags)]) -> Result<(), String> {
    if wanted.is_empty() {
        return Ok(());
    }
    let open = |p: &str| std::fs::File::open(p).map_err(|e| format!("open {p}: {e}"));
    let container = open(&format!("/proc/{pid}/ns/mnt"))?;
    let (home, root, cwd) = (open("/proc/self/ns/mnt")?, open("/")?, open(".")?);
    nix::sched::setns(container, CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("enter the container's mount namespace: {e}"))?;
    // setns leaves the root and working directory at the namespace's root: the container's.
    let applied = wanted.iter().try_for_each(|(dest, flags)| {
        nix::mount::mount(None::<&str>, dest, None::<&str>, *flags, None::<&str>)
            .map_err(|e| format!("set the propagation of mount {}: {e}", dest.display()))
    });
    // Back home. The agent's root is a chroot over the namespace's root mount (the emptied
    // initramfs), so the root is restored from its directory, not from the namespace.
    nix::sched::setns(home, CloneFlags::CLONE_NEWNS)
        .and_then(|()| nix::unistd::fchdir(root.as_raw_fd()))
        .and_then(|()| nix::unistd::chroot("."))
        .and_then(|()| nix::unistd::fchdir(cwd.as_raw_fd()))
        .map_err(|e| format!("return to the agent's mount namespace: {e}"))?;
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagation_options_are_collected_per_destination_in_order() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/a", "type": "bind", "source": "/x", "options": ["rbind", "rprivate"]},
                {"destination": "/b", "type": "bind", "source": "/y", "options": ["rbind", "ro"]},
                {"destination": "/c", "type": "bind", "source": "/z", "options": ["rshared", "rbind", "slave"]}
            ]
        }))
        .unwrap();
        let got = requested(&spec);
        assert_eq!(
            got,
            [
                ("/a".into(), MsFlags::MS_PRIVATE | MsFlags::MS_REC),
                ("/c".into(), MsFlags::MS_SHARED | MsFlags::MS_REC),
                ("/c".into(), MsFlags::MS_SLAVE),
            ]
        );
        assert!(apply(1, &[]).is_ok());
    }
}
