//! Container rootfs mounts on the host, behind the [`Mounter`] seam so that the pod model can
//! be unit-tested without mounting anything ([`HostMounter`] is the real one).
//!
//! containerd hands the shim the rootfs as mounts (usually an overlay snapshot), or none when
//! the bundle carries a `rootfs` directory of its own; either way it ends up mounted at the
//! target, which the guest sees over virtio-fs.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use containerd_shim_protos::api;

use crate::{Error, Result};

/// What to mount for one container.
#[derive(Debug, Clone, PartialEq)]
pub struct RootfsSource {
    /// containerd's mounts, applied in order; empty means "bind `bundle_rootfs`".
    pub mounts: Vec<api::Mount>,
    /// The bundle's own rootfs directory (`root.path` of the spec, under the bundle).
    pub bundle_rootfs: PathBuf,
}

/// Mounts and unmounts container rootfs on the host.
#[async_trait]
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Creates `target` and mounts the rootfs there.
    async fn mount(&self, source: &RootfsSource, target: &Path) -> Result<()>;
    /// Unmounts `target`; failures are logged (cleanup goes on regardless).
    fn unmount(&self, target: &Path);
}

/// The real mounts, through containerd-shim's mount helper.
#[derive(Debug, Default)]
pub struct HostMounter;

#[async_trait]
impl Mounter for HostMounter {
    async fn mount(&self, source: &RootfsSource, target: &Path) -> Result<()> {
        std::fs::create_dir_all(target)
            .map_err(|e| Error::io(format!("create {}", target.display()), e))?;
        let internal = |what: String, e: containerd_shim::Error| {
            Error::io(what, std::io::Error::other(e.to_string()))
        };
        if source.mounts.is_empty() {
            let m = api::Mount {
                type_: "bind".into(),
                source: source.bundle_rootfs.display().to_string(),
                options: vec!["rbind".into()],
                ..Default::default()
            };
            return containerd_shim::asynchronous::util::mount_rootfs(&m, target)
                .await
                .map_err(|e| internal("bind the rootfs".into(), e));
        }
        for m in &source.mounts {
            containerd_shim::asynchronous::util::mount_rootfs(m, target)
                .await
                .map_err(|e| internal(format!("mount the rootfs ({})", m.type_), e))?;
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) {
        unmount(target);
    }
}

/// Detaches the mount at `target` without following a symlink there: the share is writable by
/// the guest, which could otherwise point the path at a host mount.
pub fn unmount(target: &Path) {
    use nix::mount::MntFlags;
    if let Err(e) = nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        log::warn!("unmount {}: {e}", target.display());
    }
}
