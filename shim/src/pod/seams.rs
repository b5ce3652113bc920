//! The pod model's seams: the VM it runs in ([`PodVm`]) and what boots one ([`VmFactory`]).
//! The real ones are `crate::sandbox`'s; the unit tests' are `fake.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{GuestLink, LayerPolicy};
use crate::Result;

/// Where the time of a boot went, host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimes {
    pub vmm_started: Duration,
    pub agent_ready: Duration,
}

/// What an operator is shown of a pod's VM (`cocoon ps`, `admin.rs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmFacts {
    /// `qemu` or `cloud-hypervisor`, as the config names it.
    pub hypervisor: vmm_driver::config::Hypervisor,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Restored from the VM template, not booted from the kernel.
    pub from_template: bool,
    /// Its RAM maps the template's copy-on-write.
    pub ram_cloned: bool,
    /// Wall-clock time the boot began, in ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The guest's console (`console.log`, and `console.log.1` before it once it rotated).
    pub console_log: PathBuf,
    /// The console of the VM template's boot, for a VM restored from one.
    pub template_console_log: Option<PathBuf>,
}

/// A booted pod VM whose agent answered.
#[async_trait]
pub trait PodVm: Send + Sync + std::fmt::Debug {
    /// What `cocoon ps` shows of it.
    fn facts(&self) -> VmFacts;
    fn guest(&self) -> GuestLink;
    /// `<state_dir>/<sandbox>`: where `state.json` goes.
    fn run_dir(&self) -> PathBuf;
    /// The host-only directory below which container rootfs are mounted, as
    /// `<dir>/<id>/rootfs`; the guest sees its tree over virtio-fs, read-only at the top, so
    /// it can't rename or replace the paths the host will later unmount.
    fn rootfs_dir(&self) -> PathBuf;
    /// The VM's host processes, for `shim delete` after a crash.
    fn host_pids(&self) -> Vec<(String, u32)>;
    fn boot_times(&self) -> Option<BootTimes>;
    /// Why the VM is gone, if its VMM exited.
    fn exit_reason(&mut self) -> Option<String>;
    /// The process that serves the share (virtiofsd): volumes are bound in its mount
    /// namespace (`crate::volumes::ns`).
    fn share_pid(&self) -> Option<u32>;
    /// Adds and removes layer disks (`layer_rootfs.rs`), where the VMM can.
    fn disk_hotplug(&self) -> Option<Arc<dyn vmm_driver::DiskHotplug>> {
        None
    }
    /// Plugs the share in, for a VM booted without it; None when it has one.
    fn share_hotplug(&self) -> Option<Arc<dyn vmm_driver::ShareHotplug>> {
        None
    }
    /// Accounts host processes the VM started after its boot (a late virtiofsd) like the
    /// others: the pod's cgroup.
    fn place_helpers(&self) {}
    /// The host pid to report for every process of the pod (the VMM's, as Kata does): a guest
    /// pid names nothing on the host, and Docker joins the pod's netns through this pid.
    /// `None` reports guest pids.
    fn reported_pid(&self) -> Option<u32> {
        None
    }
    /// Raises the OOM score of the VM's host processes to `adj` where it is lower: a container
    /// of the pod asked for it (`placement`).
    fn raise_oom_score(&self, adj: i32);
    /// The cgroup the VM's host processes joined, for `shim delete` after a crash.
    fn cgroup(&self) -> Option<PathBuf> {
        None
    }
    /// Kills the VM at once, for a guest that no longer answers: its processes end as if the
    /// VM crashed (exit 255), and [`PodVm::exit_reason`] says so from then on.
    fn kill(&mut self);
    /// Powers the guest off and reaps every host process of the VM, whatever happens.
    async fn shutdown(self: Box<Self>) -> Result<()>;
}

/// Boots the VM for a pod, sized from the spec of its first container.
#[async_trait]
pub trait VmFactory: Send + Sync + std::fmt::Debug {
    /// `share`: whether the VM starts with the virtio-fs share (else it is plugged in when a
    /// container needs it, `mounts.rs`).
    async fn boot(
        &self,
        sandbox_id: &str,
        spec: &serde_json::Value,
        share: bool,
    ) -> Result<Box<dyn PodVm>>;
    /// Whether container rootfs may come as layer disks, and from which cache; `None` keeps
    /// every rootfs on the share.
    fn layer_policy(&self) -> Option<LayerPolicy> {
        None
    }
}
