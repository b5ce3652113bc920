//! A container's host mounts: its rootfs, and its volume binds, which the pod shares between
//! containers ([`crate::volumes::Slots`]); what `state.json` records of them; their removal.

use std::path::{Path, PathBuf};

use super::{Pod, PodState};
use crate::rootfs::Mounter;
use crate::volumes::{Plan, GUEST_SHARE};
use crate::Result;

impl Pod {
    /// Binds the planned volumes in the host tree at `root` (only those no other container of
    /// the pod binds already) and points each bind's spec source at its guest path. Returns the
    /// slots taken; on failure it has released them again.
    pub(super) async fn bind_volumes(&self, plan: &mut Plan, root: &Path) -> Result<Vec<PathBuf>> {
        let mut held: Vec<PathBuf> = vec![];
        for b in &plan.binds {
            let (target, new) = self.with_state(|s| s.volumes.acquire(root, b)).await;
            let rel = target.strip_prefix(root).unwrap_or(&target).to_owned();
            if new {
                let staging = root
                    .with_file_name(vmm_driver::share::STAGING_DIR)
                    .join(&rel);
                if let Err(e) = self.inner.mounter.bind_volume(b, &staging, &target) {
                    // Not mounted: `bind` left nothing behind.
                    self.with_state(|s| s.volumes.release(&[target])).await;
                    self.release_volumes(&held).await;
                    return Err(e);
                }
            }
            plan.spec["mounts"][b.mount]["source"] =
                serde_json::Value::String(format!("{GUEST_SHARE}/{}", rel.display()));
            if b.recursive {
                let below = crate::volumes::mounts_below(&target);
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
    /// Records in `state.json` what is mounted now: each container's rootfs and the volume
    /// binds still held.
    pub(super) fn record_mounts(&mut self) {
        let mut mounts: Vec<PathBuf> = self.containers.values().map(|c| c.rootfs.clone()).collect();
        mounts.extend(self.volumes.held().map(Path::to_path_buf));
        self.footprint.mounts = mounts;
        self.save_footprint();
    }
}

/// Unmounts volume binds and removes their mount points (and the slots' directory once empty).
pub(super) fn unmount_volumes(mounter: &dyn Mounter, volumes: &[PathBuf]) {
    for v in volumes {
        mounter.unmount(v);
        crate::volumes::remove_target(v);
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
