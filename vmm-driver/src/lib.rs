//! Starts, reaches and stops the VM of one pod.
//!
//! Nothing here knows about containers: a VM is a kernel, an initramfs, a shared directory and
//! a vsock endpoint where the guest agent will answer.
//!
//! This file holds only what callers program against: [`VmSpec`], the [`Vmm`] trait and
//! [`launch`]. The pieces both backends share live in modules of their own (the boot payload
//! in `boot`, the run directory in `run_dir`, processes in `daemon`, virtiofsd in `virtiofsd`,
//! reaching the agent in `guest`), and the paths other crates use are re-exported below.

pub mod accel;
mod boot;
pub mod cloud_hypervisor;
pub mod config;
mod console;
mod daemon;
pub mod error;
mod guest;
pub mod qemu;
mod run_dir;
pub mod serial;
pub mod share;
mod stream;
mod supervise;
mod virtiofsd;
pub mod vsock;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use boot::kernel_cmdline;
pub use config::Config;
pub use console::CONSOLE_CAP;
pub use daemon::{children_of, resolve_binary, start_time, tail_lines};
pub use error::{Error, Result};
pub use guest::connect_guest;
pub use run_dir::{recorded_processes, Recorded};
pub use virtiofsd::{VIRTIOFSD, VIRTIOFS_TAG};

/// What one VM should be; the backend decides how.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id; names the VM in logs and process titles.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Per-VM directory for sockets, logs and the shared dir. Created by launch, removed by stop.
    pub run_dir: PathBuf,
    /// Appended to the kernel command line after the config's own.
    pub kernel_params: Vec<String>,
    /// The pod's network interfaces, one virtio-net each, in this order.
    pub nics: Vec<Nic>,
    /// A network namespace to start the VMM in: the pod's, when the caller made one (Docker
    /// wires a container's network into the netns of the pid the runtime reports).
    pub netns: Option<PathBuf>,
    /// How many NICs may be added while the VM runs ([`Vmm::nic_hotplug`]).
    pub hotplug_nics: u8,
    /// Whether the VM starts with the virtio-fs share and its virtiofsd. Without it (issue
    /// #29's pods that bind no host directory) [`Vmm::share_hotplug`] adds it when needed;
    /// a backend that can't do that starts with it anyway.
    pub share: bool,
    /// Whether more containers may join the VM after its first (a CRI pod sandbox). Such a VM
    /// keeps its RAM shared even when it starts lean, so that a later container that binds a
    /// host directory can still get the share (vhost-user daemons map guest RAM).
    pub later_containers: bool,
}

/// One guest NIC backed by a tap the caller opened (in the pod's network namespace). The
/// VMM gets its own copy of the fd; the tap goes away once every copy is closed.
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap: std::sync::Arc<std::os::fd::OwnedFd>,
    /// The guest side's MAC, `aa:bb:cc:dd:ee:ff`: the pod interface's, so that neighbours
    /// and the pod's own ARP answers stay valid.
    pub mac: String,
}

impl VmSpec {
    /// A VM sized by the config's defaults, living in `<state_dir>/<id>`.
    pub fn from_config(cfg: &Config, id: &str) -> VmSpec {
        VmSpec {
            id: id.to_owned(),
            vcpus: cfg.vm.vcpus,
            memory_mib: cfg.vm.memory_mib,
            run_dir: cfg.state_dir.join(id),
            kernel_params: vec![],
            nics: vec![],
            netns: None,
            hotplug_nics: 0,
            share: true,
            later_containers: false,
        }
    }
}

/// A running VM. Backends differ in how they start and stop; callers see only this.
#[async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Where the guest's vsock ports are reached.
    fn agent_endpoint(&self) -> &vsock::VsockEndpoint;
    /// The guest serial console, for error messages and debugging.
    fn console_log(&self) -> PathBuf;
    /// Every host process this VM owns, by name.
    fn pids(&self) -> Vec<(&'static str, u32)>;
    /// Why the VM is gone: its VMM exited (guest poweroff, crash, kill), or, during the boot,
    /// a helper it can't run without did (the VMM is then killed too, rather than waiting for
    /// an agent that never comes; after the boot the helpers' supervisor does that).
    fn exit_error(&mut self) -> Option<Error>;
    /// Waits up to `timeout` for the VMM to exit on its own; true if it did.
    async fn wait_exit(&mut self, timeout: Duration) -> bool;
    /// Kills the VMM at once (SIGKILL; a stopped process dies too), for a guest that no longer
    /// answers. The guest is lost; its helpers end when their VMM connection drops, and
    /// [`Vmm::stop`] still reaps them all.
    fn kill(&mut self);
    /// Stops the VMM and every helper, reaps them all and removes the run directory.
    /// Safe to call more than once and after a failed start.
    async fn stop(&mut self) -> Result<()>;
    /// Adds NICs while the VM runs, if the spec asked for room (`hotplug_nics`) and the
    /// backend can.
    fn nic_hotplug(&self) -> Option<std::sync::Arc<dyn NicHotplug>> {
        None
    }
    /// Plugs read-only disks in while the VM runs, where the backend can.
    fn disk_hotplug(&self) -> Option<std::sync::Arc<dyn DiskHotplug>> {
        None
    }
    /// Plugs the virtio-fs share in, for a VM started without it ([`VmSpec::share`]); None
    /// when the VM had it from the start.
    fn share_hotplug(&self) -> Option<std::sync::Arc<dyn ShareHotplug>> {
        None
    }
    /// Whether the guest's RAM is a copy-on-write clone of a VM template's, which no
    /// vhost-user daemon can map and whose freed pages the VMM can't take back.
    fn ram_cloned(&self) -> bool {
        false
    }
    /// Whether the VM was restored from a VM template rather than booted from the kernel
    /// (`cocoon ps` shows which).
    fn restored_from_template(&self) -> bool {
        false
    }
    /// The console of the template's boot, for a VM restored from one: its kernel and agent
    /// start lines are there, not in [`Vmm::console_log`] (`cocoon logs` shows both).
    fn template_console_log(&self) -> Option<PathBuf> {
        None
    }
}

/// Adds the virtio-fs share (and its virtiofsd) to a VM that started without it.
#[async_trait]
pub trait ShareHotplug: Send + Sync + std::fmt::Debug {
    /// Starts virtiofsd and plugs the share's device in; once it is in, returns at once. The
    /// guest sees the device a moment later.
    async fn attach(&self) -> Result<()>;
}

/// Plugs read-only disks into a running VM and takes them out (issue #29's layer images).
#[async_trait]
pub trait DiskHotplug: Send + Sync + std::fmt::Debug {
    /// Plugs `image` (opened read-only, without `O_DIRECT`) in as a read-only SCSI disk;
    /// returns its LUN on the VM's one controller, by which the guest finds it. `name` is for
    /// logs. A LUN is never reused while the VM runs.
    async fn add_disk(&self, image: &std::fs::File, name: &str) -> Result<u32>;
    /// Plugs `disk` (opened read-write, without `O_DIRECT`) in as a writable SCSI disk that
    /// only the guest reads (a container's writable layer); returns its LUN.
    async fn add_scratch(&self, disk: &std::fs::File, name: &str) -> Result<u32>;
    /// Takes the disk at `lun` out; the guest must have stopped using it.
    async fn remove_disk(&self, lun: u32) -> Result<()>;
}

/// Adds NICs to a running VM. A handle of its own, so that a caller can hot-plug without
/// holding whatever owns the VM.
#[async_trait]
pub trait NicHotplug: Send + Sync + std::fmt::Debug {
    /// Plugs in a virtio-net device on `nic`'s tap; the guest sees it a moment later.
    async fn add_nic(&self, nic: &Nic) -> Result<()>;
}

/// Boots a VM with the configured hypervisor.
pub async fn launch(cfg: &Config, spec: &VmSpec) -> Result<Box<dyn Vmm>> {
    match cfg.hypervisor {
        config::Hypervisor::Qemu => Ok(Box::new(qemu::QemuVm::launch(cfg, spec).await?)),
        config::Hypervisor::CloudHypervisor => {
            Ok(Box::new(cloud_hypervisor::ChVm::launch(cfg, spec).await?))
        }
    }
}
