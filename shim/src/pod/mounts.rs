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

    /// Whether a VM booted for the container of `req` starts with the virtio-fs share: only
    /// when it needs it now, for a host directory or a rootfs that stays on the share. A pod
    /// whose container binds nothing and has its rootfs as layer disks runs no virtiofsd until a
    /// later container needs one ([`Pod::ensure_share`]). `io.cocoon.share: always` (per pod)
    /// and `[vm] share = "always"` (per handler, applied by the factory) force the share.
    pub(super) fn share_at_boot(&self, req: &super::CreateRequest, plan: &Plan) -> bool {
        let why = if crate::annotations::share_always(&req.spec).unwrap_or(true) {
            Some("io.cocoon.share=always")
        } else if !plan.binds.is_empty() {
            Some("a host directory or file is bound")
        } else if crate::annotations::rootfs_on_share(&req.spec).unwrap_or(true) {
            Some("the rootfs is asked for on the share")
        } else if super::layers_of(&req.rootfs).is_err() {
            Some("the rootfs can't come as layer disks")
        } else if self.inner.factory.layer_policy().is_none() {
            Some("rootfs layer disks are off")
        } else {
            None
        };
        match why {
            Some(why) => log::info!("pod {}: VM with the virtio-fs share ({why})", self.id()),
            None => log::info!(
                "pod {}: VM without the virtio-fs share and virtiofsd (nothing to share yet)",
                self.id()
            ),
        }
        why.is_some()
    }

    /// Plugs the share into a VM that started without it, before container `cid` uses it:
    /// virtiofsd starts, joins the pod's cgroup and the crash record.
    pub(super) async fn ensure_share(&self, cid: &str) -> Result<()> {
        let plug = self
            .with_state(|s| {
                let vm = s.vm.as_ref()?;
                vm.share_pid()
                    .is_none()
                    .then(|| vm.share_hotplug())
                    .flatten()
            })
            .await;
        let Some(plug) = plug else {
            return Ok(());
        };
        log::info!("container {cid}: plugging in the pod's virtio-fs share");
        plug.attach().await.map_err(Error::Vmm)?;
        self.with_state(|s| {
            let Some(vm) = &s.vm else {
                return;
            };
            vm.place_helpers();
            super::record_processes(&mut s.footprint, vm.as_ref());
            s.save_footprint();
        })
        .await;
        Ok(())
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
