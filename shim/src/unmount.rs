//! Detaching a host mount the way every part of the shim must: lazily, and never through a
//! symlink. Its own room because the rootfs mounts, the volumes and the crash cleanup all
//! undo mounts, and none of them should need another for it.

use std::path::Path;

/// Detaches the mount at `target` without following a symlink there: the share is writable by
/// the guest, which could otherwise point the path at a host mount.
pub fn unmount(target: &Path) {
    use nix::mount::MntFlags;
    if let Err(e) = nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        log::warn!("unmount {}: {e}", target.display());
    }
}
