//! A container's host mounts: its rootfs, and its volume binds, which the pod shares between
//! containers ([`crate::volumes::Slots`]); what `state.json` records of them; their removal.

use std::path::{Path, PathBuf};

use super::{Pod, PodState};
use crate::rootfs::Mounter;
use crate::volumes::{mounts_below_in, Placement, Plan, GUEST_SHARE};
use crate::{Error, Result};

impl Pod {
    /// Binds the planned volumes at their slots in the host tree at `root`, inside virtiofsd's
    /// mount namespace (only those no other container of the pod binds already), and points each bind's spec source at its guest path. Returns the
    /// slots taken; on failure it has released them again.
    pub(super) async fn bind_volumes(&self, plan: &mut Plan, root: &Path) -> Result<Vec<PathBuf>> {
        let mut held: Vec<PathBuf> = vec![];
        if plan.binds.is_empty() {
            return Ok(held);
        }
        let share_pid = self
            .with_state(|s| s.vm.as_ref().and_then(|vm| vm.share_pid()))
            .await
            .ok_or(Error::NotRunning)?;
        for b in &plan.binds {
            let (target, new) = self.with_state(|s| s.volumes.acquire(root, b)).await;
            let rel = target.strip_prefix(root).unwrap_or(&target).to_owned();
            // virtiofsd's root is the export, which shows the host tree at `root`.
            let in_share = Path::new("/").join(&rel);
            if new {
                let staging = root
                    .with_file_name(vmm_driver::share::STAGING_DIR)
                    .join(&rel);
                let at = Placement::new(share_pid, in_share.clone());
                if let Err(e) = self.inner.mounter.bind_volume(b, &staging, &target, &at) {
                    // Not mounted: `bind` left nothing behind.
                    self.with_state(|s| s.volumes.release(&[target])).await;
                    self.release_volumes(&held).await;
                    return Err(e);
                }
            }
            plan.spec["mounts"][b.mount]["source"] =
                serde_json::Value::String(format!("{GUEST_SHARE}/{}", rel.display()));
            if b.recursive {
                let below = mounts_below_in(&share_pid.to_string(), &in_share);
                plan.submounts.extend(
                    below
                        .iter()
                        .map(|sub| format!("{GUEST_SHARE}/{}/{}", rel.display(), sub.display())),
                );
            }
            held.push(target);
        }
        Ok(held)
    }

    /// Drops a container's use of `volumes`, unmounting those nobody else uses.
    pub(super) async fn release_volumes(&self, volumes: &[PathBuf]) {
        let gone = self.with_state(|s| s.volumes.release(volumes)).await;
        unmount_volumes(self.inner.mounter.as_ref(), &gone);
    }
}

impl PodState {
    /// Records in `state.json` what is mounted on the host now: each container's rootfs. (The
    /// volume binds live in virtiofsd's namespace and go with it.)
    pub(super) fn record_mounts(&mut self) {
        self.footprint.mounts = self
            .containers
            .values()
            .filter_map(|c| c.rootfs.clone())
            .collect();
        self.save_footprint();
    }
}

/// Takes volume binds away (their mount points go, and the slots' directory once empty).
pub(super) fn unmount_volumes(mounter: &dyn Mounter, volumes: &[PathBuf]) {
    for v in volumes {
        mounter.unbind_volume(v);
        if let Some(dir) = v.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Unmounts a container's rootfs and removes its mount point and directory, never
/// recursively: if the unmount failed, the rootfs must not be emptied through it.
pub(super) fn unmount_rootfs(mounter: &dyn Mounter, rootfs: &Path) {
    mounter.unmount(rootfs);
    let _ = std::fs::remove_dir(rootfs);
    if let Some(dir) = rootfs.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}
