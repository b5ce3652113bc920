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
    /// Creates `target` and mounts the rootfs there, preparing it at `staging` (a directory
    /// outside the exported tree, see `vmm_driver::share::STAGING_DIR`).
    async fn mount(&self, source: &RootfsSource, staging: &Path, target: &Path) -> Result<()>;
    /// Binds a volume's host source at `target`, inside the namespace `at` names, preparing it
    /// at `staging` (`crate::volumes::bind`).
    fn bind_volume(
        &self,
        bind: &crate::volumes::Bind,
        staging: &Path,
        target: &Path,
        at: &crate::volumes::Placement,
    ) -> Result<()>;
    /// Takes a volume bind away by removing its mount point `target` on the host, which
    /// detaches the bind in virtiofsd's namespace (`crate::volumes::ns`).
    fn unbind_volume(&self, target: &Path);
    /// Unmounts `target`; failures are logged (cleanup goes on regardless).
    fn unmount(&self, target: &Path);
}

/// The real mounts, through containerd-shim's mount helper.
#[derive(Debug, Default)]
pub struct HostMounter;

#[async_trait]
impl Mounter for HostMounter {
    async fn mount(&self, source: &RootfsSource, staging: &Path, target: &Path) -> Result<()> {
        for d in [staging, target] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        }
        let placed = async {
            mount_source(source, staging).await?;
            harden(staging)?;
            // A bind copies the staged mount's flags; so do the copies that propagate from it.
            bind(staging, target)
        }
        .await;
        // The staging mount goes in every case: the target holds its own reference.
        crate::unmount::unmount(staging);
        let _ = std::fs::remove_dir(staging);
        placed
    }

    fn bind_volume(
        &self,
        bind: &crate::volumes::Bind,
        staging: &Path,
        target: &Path,
        at: &crate::volumes::Placement,
    ) -> Result<()> {
        crate::volumes::bind(bind, staging, target, at)
    }

    fn unbind_volume(&self, target: &Path) {
        crate::volumes::remove_target(target);
    }

    fn unmount(&self, target: &Path) {
        crate::unmount::unmount(target);
    }
}

/// containerd's mounts at `target`, or a bind of the bundle's rootfs when there are none.
async fn mount_source(source: &RootfsSource, target: &Path) -> Result<()> {
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

/// Makes a mount `nosuid,nodev`, keeping it read-only if it is (the containerd CVE-2021-41103
/// class: nothing the guest writes in its rootfs may become a setuid binary or a device node
/// that the host, or virtiofsd on the guest's behalf, would honour). A bind ignores these
/// flags at mount time, so this is a per-mount remount.
fn harden(target: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    use nix::sys::statvfs::{statvfs, FsFlags};
    let ro = statvfs(target)
        .map(|s| s.flags().contains(FsFlags::ST_RDONLY))
        .unwrap_or(false);
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if ro {
        flags |= MsFlags::MS_RDONLY;
    }
    let none: Option<&str> = None;
    nix::mount::mount(none, target, none, flags, none).map_err(|e| {
        Error::io(
            format!("make {} nosuid,nodev", target.display()),
            std::io::Error::from(e),
        )
    })
}

/// Recursively binds `from` at `to`.
fn bind(from: &Path, to: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    let none: Option<&str> = None;
    nix::mount::mount(
        Some(from),
        to,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| {
        Error::io(
            format!("bind {} at {}", from.display(), to.display()),
            std::io::Error::from(e),
        )
    })
}
