//! QEMU backend: command line plus QMP, with per-VM virtiofsd and vhost-device-vsock.

pub mod cmdline;
mod disks;
mod hotplug;
mod late_share;
pub mod qmp;
mod restore;
pub mod template;
mod template_ram;
pub mod version;
mod vsockd;

pub use restore::default_identity;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use command_fds::{CommandFdExt, FdMapping};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::accel::{self, Chosen, HostFacts};
use crate::boot::{check_image, kernel_cmdline};
use crate::config::{Config, VsockMode};
use crate::console::{ConsoleRelay, Output};
use crate::daemon::with_helpers;
use crate::daemon::{
    exited_within, resolve_binary, wait_for_socket, Daemon, DAEMON_READY, STOP_GRACE,
};
use crate::error::{Error, Result};
use crate::run_dir::RunDir;
use crate::serial::SerialLink;
use crate::virtiofsd::{spawn_virtiofsd, VIRTIOFS_TAG};
use crate::vsock::{VsockEndpoint, VsockTransport};
use crate::{VmSpec, Vmm};
use cmdline::{QemuLaunch, VsockDevice};
use qmp::Qmp;

/// QEMU's tap fds start here, above stdio.
const FIRST_NIC_FD: i32 = 3;

/// How long QEMU may take to open its QMP socket.
const QMP_READY: Duration = Duration::from_secs(10);
/// Context id of the guest behind a per-VM vhost-device-vsock; each VM has its own daemon.
const HYBRID_GUEST_CID: u32 = 3;

/// A QEMU VM and its helpers.
#[derive(Debug)]
pub struct QemuVm {
    dir: RunDir,
    endpoint: VsockEndpoint,
    qemu: Option<Daemon>,
    virtiofsd: Option<Daemon>,
    vsockd: Option<Daemon>,
    /// The share plugged in on demand, for a VM that started without it.
    late_share: Option<Arc<late_share::LateShare>>,
    /// Shared with [`hotplug::QemuHotplug`], which adds NICs while the VM runs.
    qmp: Option<Arc<tokio::sync::Mutex<Qmp<UnixStream>>>>,
    /// NICs added after the boot: the pod's own, for a VM restored from a template, and
    /// Docker's late ones.
    hotplug: Option<Arc<hotplug::QemuHotplug>>,
    /// Layer images added while the VM runs (`disks.rs`).
    disks: Option<Arc<disks::QemuDisks>>,
    /// How many late NICs the spec asked room for.
    hotplug_slots: u8,
    /// Stops the VM when a helper dies (`supervise.rs`).
    supervisor: Option<crate::supervise::Supervisor>,
    /// Whether its RAM is the template's, copy-on-write (`restore.rs`).
    ram_cloned: bool,
    /// The template it was restored from (`restore.rs`), if it was not booted.
    restored_from: Option<PathBuf>,
    /// Writes the guest console to `console.log`, capped.
    console: Option<ConsoleRelay>,
}

/// The agent's channel for the VMs of a config: `vsock`, with `auto` taking the kernel's
/// vhost-vsock where the host has it and hybrid vsock otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    Hybrid,
    Kernel,
    Serial,
}

impl Channel {
    pub(crate) fn of(cfg: &Config) -> Channel {
        match cfg.vsock {
            VsockMode::Hybrid => Channel::Hybrid,
            VsockMode::Kernel => Channel::Kernel,
            VsockMode::Serial => Channel::Serial,
            VsockMode::Auto if Path::new("/dev/vhost-vsock").exists() => Channel::Kernel,
            // No vhost-user daemon: the pod can be a clone of the template's RAM (`restore.rs`).
            VsockMode::Auto => Channel::Serial,
        }
    }
}

/// The serial channel's socket in the run directory (QEMU serves it).
const SERIAL_SOCKET: &str = "agent.sock";

struct Binaries {
    qemu: PathBuf,
    /// `qemu`'s release (`version.rs`).
    version: version::QemuVersion,
    virtiofsd: PathBuf,
    vsockd: Option<PathBuf>,
}

impl QemuVm {
    /// Checks everything that can be checked before a process starts, then boots. Any failure
    /// after the first process started tears down what was started.
    pub async fn launch(cfg: &Config, spec: &VmSpec) -> Result<QemuVm> {
        let channel = Channel::of(cfg);
        let hybrid = channel == Channel::Hybrid;
        let qemu = resolve_binary("qemu-system-x86_64", "qemu", &cfg.paths.qemu)?;
        let bins = Binaries {
            version: version::probe(&qemu, &cfg.template_dir).await?,
            qemu,
            virtiofsd: resolve_binary("virtiofsd", "virtiofsd", &cfg.paths.virtiofsd)?,
            vsockd: if hybrid {
                Some(resolve_binary(
                    "vhost-device-vsock",
                    "vhost_device_vsock",
                    &cfg.paths.vhost_device_vsock,
                )?)
            } else {
                None
            },
        };
        check_image(cfg)?;
        let (chosen, why) = accel::choose(cfg.accel, &HostFacts::probe())?;
        log::info!("VM {}: accel {chosen:?} ({why})", spec.id);
        if let Some(notice) = chosen.security_notice() {
            log::warn!("VM {}: {notice}", spec.id);
        }

        let use_template = match (cfg.vm.template, channel) {
            (crate::config::TemplateMode::Off, _) => false,
            (_, Channel::Kernel) => {
                log::info!(
                    "VM {}: no VM template with kernel vsock yet; booting the kernel",
                    spec.id
                );
                false
            }
            _ if spec.nics.len() + usize::from(spec.hotplug_nics)
                > usize::from(template::NIC_PORTS) =>
            {
                log::info!(
                    "VM {}: more NICs than a VM template has room for ({}); booting the kernel",
                    spec.id,
                    template::NIC_PORTS
                );
                false
            }
            _ => true,
        };
        if use_template {
            match QemuVm::start(cfg, spec, &bins, chosen, channel, true).await {
                Err(Error::Template(why)) => {
                    log::warn!("VM {}: {why}; booting the kernel instead", spec.id);
                }
                other => return other,
            }
        }
        QemuVm::start(cfg, spec, &bins, chosen, channel, false).await
    }

    /// One attempt: from the template if `from_template`, else a kernel boot. Any failure
    /// stops everything it started.
    async fn start(
        cfg: &Config,
        spec: &VmSpec,
        bins: &Binaries,
        chosen: Chosen,
        channel: Channel,
        from_template: bool,
    ) -> Result<QemuVm> {
        let dir = RunDir::create(&spec.run_dir)?;
        let endpoint = VsockEndpoint {
            transport: match channel {
                Channel::Hybrid => VsockTransport::Hybrid(vsockd::uds_path(&dir)),
                Channel::Kernel => VsockTransport::Kernel { cid: kernel_cid()? },
                Channel::Serial => {
                    VsockTransport::Serial(SerialLink::new(&dir.path(SERIAL_SOCKET)))
                }
            },
            key: Some(dir.hand_fw_cfg_key()?),
        };
        let mut vm = QemuVm {
            dir,
            endpoint,
            qemu: None,
            virtiofsd: None,
            late_share: None,
            vsockd: None,
            qmp: None,
            hotplug: None,
            disks: None,
            hotplug_slots: spec.hotplug_nics,
            supervisor: None,
            console: None,
            ram_cloned: false,
            restored_from: None,
        };
        match vm.boot(cfg, spec, bins, chosen, from_template).await {
            Ok(()) => {
                if let (false, Some(qmp), Some(q)) = (spec.share, &vm.qmp, &vm.qemu) {
                    let share = late_share::LateShare::new(
                        &spec.id,
                        cfg,
                        vm.dir.handle(),
                        bins.virtiofsd.clone(),
                        qmp.clone(),
                        q.watched(),
                    );
                    vm.late_share = Some(Arc::new(if vm.ram_cloned {
                        share.refused()
                    } else {
                        share
                    }));
                    log::info!("VM {}: started without the virtio-fs share", spec.id);
                }
                if let Err(e) = vm.supervise(&spec.id) {
                    log::warn!("VM {}: helpers are not supervised: {e}", spec.id);
                }
                Ok(vm)
            }
            Err(e) => {
                // QEMU fails its device setup when a helper died under it; the helper is what
                // to name. Not so when QEMU refused a template: the helpers end because it did.
                let dead = match e {
                    Error::Template(_) => None,
                    _ => crate::daemon::first_exited([&mut vm.virtiofsd, &mut vm.vsockd]),
                };
                let e = match dead {
                    Some(dead) => {
                        log::warn!("VM {}: {e}", spec.id);
                        dead
                    }
                    None => e,
                };
                if let Err(stop_err) = vm.stop().await {
                    log::warn!("cleanup after failed launch: {stop_err}");
                }
                Err(e)
            }
        }
    }

    async fn boot(
        &mut self,
        cfg: &Config,
        spec: &VmSpec,
        bins: &Binaries,
        accel: Chosen,
        from_template: bool,
    ) -> Result<()> {
        // A VM that starts without the share gets it from `late_share.rs` when it needs it.
        let fs_sock = match spec.share {
            true => {
                let (fs, sock) = spawn_virtiofsd(cfg, &self.dir, &bins.virtiofsd)?;
                self.virtiofsd = Some(fs);
                Some(sock)
            }
            false => None,
        };

        let vhost_sock = vsockd::vhost_path(&self.dir);
        if let Some(bin) = &bins.vsockd {
            self.vsockd = Some(vsockd::spawn(
                &self.dir,
                bin,
                HYBRID_GUEST_CID,
                unprivileged_id()?,
            )?);
        }
        // Both daemons start together; only then can QEMU connect to them.
        if let (Some(d), Some(sock)) = (self.virtiofsd.as_mut(), &fs_sock) {
            wait_for_socket(d, sock, DAEMON_READY).await?;
        }
        if let Some(d) = self.vsockd.as_mut() {
            wait_for_socket(d, &vhost_sock, DAEMON_READY).await?;
            if let Some(uds) = self.endpoint.hybrid_socket() {
                crate::daemon::make_private(uds)?;
            }
        }

        let console_socket = self.dir.console_socket();
        self.console = Some(ConsoleRelay::start(
            &console_socket,
            Output::new(self.dir.console_log(), &spec.id, cfg),
        )?);
        let launch = QemuLaunch {
            name: format!("cocoon-{}", spec.id),
            console_socket,
            qmp_socket: self.dir.path("qmp.sock"),
            vsock: match &self.endpoint.transport {
                VsockTransport::Hybrid(_) => VsockDevice::VhostUser(vhost_sock),
                VsockTransport::Kernel { cid } => VsockDevice::Kernel { cid: *cid },
                VsockTransport::Serial(link) => VsockDevice::Serial(link.socket().to_owned()),
            },
            virtiofs_socket: fs_sock,
            run_as: Some(unprivileged_id()?).map(|id| (id, id)),
            agent_key: Some(self.dir.fw_cfg_key_file()),
            ..shaped(cfg, spec, accel, bins.version)
        };
        if from_template {
            return self.restore(cfg, spec, bins, launch).await;
        }
        let mut launch = launch;
        let mut q = Command::new(&bins.qemu);
        let mut fds = Vec::with_capacity(spec.nics.len());
        let vhost = Path::new("/dev/vhost-net").exists();
        for (i, nic) in spec.nics.iter().enumerate() {
            let fd = FIRST_NIC_FD + i32::try_from(i).unwrap_or(0);
            let parent_fd = nic
                .tap
                .try_clone()
                .map_err(|e| Error::io("dup the pod's tap fd", e))?;
            fds.push(FdMapping {
                parent_fd,
                child_fd: fd,
            });
            launch.nics.push(cmdline::NicArg {
                fd,
                mac: nic.mac.clone(),
                vhost,
            });
        }
        q.fd_mappings(fds)
            .map_err(|e| Error::io("hand QEMU the tap fds", std::io::Error::other(e)))?;
        q.args(cmdline::qemu_args(&launch));
        log::debug!("VM {}: {:?}", spec.id, q.as_std());
        // In the pod's netns when the caller made one: Docker finds the pod's network through
        // the pid the shim reports, which is QEMU's.
        self.qemu = Some(self.dir.spawn("qemu", q, spec.netns.as_deref())?);
        let qmp = self
            .connect_qmp(&launch.qmp_socket, cfg.vmm.api_timeout())
            .await?;
        let qmp = Arc::new(tokio::sync::Mutex::new(qmp));
        self.hotplug = Some(Arc::new(hotplug::QemuHotplug::new(
            qmp.clone(),
            spec.hotplug_nics,
        )));
        self.disks = Some(Arc::new(disks::QemuDisks::new(qmp.clone())));
        self.qmp = Some(qmp);
        Ok(())
    }

    /// Watches virtiofsd and vhost-device-vsock for as long as the VM runs.
    fn supervise(&mut self, id: &str) -> Result<()> {
        let Some(qemu) = &self.qemu else {
            return Ok(());
        };
        let helpers: Vec<_> = [&self.virtiofsd, &self.vsockd]
            .into_iter()
            .flatten()
            .map(Daemon::watched)
            .collect();
        self.supervisor = Some(crate::supervise::Supervisor::start(
            id,
            &qemu.watched(),
            &helpers,
        )?);
        Ok(())
    }

    async fn connect_qmp(&mut self, sock: &Path, limit: Duration) -> Result<Qmp<UnixStream>> {
        let Some(qemu) = self.qemu.as_mut() else {
            return Err(Error::Qmp("QEMU is not running".into()));
        };
        let dir = &self.dir;
        wait_for_qmp(qemu, sock, limit, |_, status| {
            dir.vm_exited("qemu.log", status.to_string())
        })
        .await
    }
}

/// The kernel-boot launch of a VM shaped by `cfg` and `spec`, with placeholders for what each
/// VM has of its own (name, sockets, uid): the one place the machine's shape is set, so that
/// a pod and `check` name the same template.
fn shaped(cfg: &Config, spec: &VmSpec, accel: Chosen, version: version::QemuVersion) -> QemuLaunch {
    let channel = Channel::of(cfg);
    QemuLaunch {
        name: String::new(),
        version,
        accel,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel: cfg.kernel.clone(),
        initramfs: cfg.initramfs.clone(),
        cmdline: match channel {
            // The agent looks for its port only where the host said so.
            Channel::Serial => format!(
                "{} {}",
                kernel_cmdline(cfg, spec),
                cocoon_protocol::SERIAL_CHANNEL_ARG
            ),
            _ => kernel_cmdline(cfg, spec),
        },
        console_socket: "/console".into(),
        qmp_socket: "/qmp".into(),
        vsock: match channel {
            Channel::Serial => VsockDevice::Serial("/agent".into()),
            _ => VsockDevice::VhostUser("/vsock".into()),
        },
        virtiofs_socket: Some("/fs".into()),
        virtiofs_tag: VIRTIOFS_TAG.into(),
        nics: vec![],
        hotplug_slots: spec.hotplug_nics,
        run_as: None,
        template: None,
        ram_file: None,
        ram_private: false,
        agent_key: Some("/key".into()),
    }
}

/// Connects to `qemu`'s QMP socket once it exists; if QEMU exits first, the error is what
/// `exited` makes of it and its status.
pub(crate) async fn wait_for_qmp(
    qemu: &mut Daemon,
    sock: &Path,
    limit: Duration,
    exited: impl FnOnce(&Daemon, std::process::ExitStatus) -> Error,
) -> Result<Qmp<UnixStream>> {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(status) = qemu.try_exited() {
            return Err(exited(qemu, status));
        }
        if sock.exists() {
            if let Ok(q) = Qmp::connect(sock, limit).await {
                return Ok(q);
            }
        }
        if start.elapsed() > QMP_READY {
            return Err(Error::Qmp(format!(
                "QEMU did not open {} within {QMP_READY:?}",
                sock.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The first of the ids a VM's QEMU runs as. systemd leaves 0x70000000..0x7FFE0000 unused
/// (below it: container ranges; above: its "foreign" range and ids that tools read as
/// negative), so no user or group of the host owns anything there.
const VM_ID_BASE: u32 = 0x7000_0000;
/// How many ids VMs draw from.
const VM_ID_SPAN: u32 = 1 << 24;

/// A random unprivileged uid (used as gid too) for one VM's QEMU: one per VM, so a QEMU that
/// a guest took over can't signal or trace another pod's (the odds that two VMs share one are
/// one in 16 million per pair).
fn unprivileged_id() -> Result<u32> {
    Ok(VM_ID_BASE + random_u32()? % VM_ID_SPAN)
}

fn random_u32() -> Result<u32> {
    let mut b = [0u8; 4];
    cocoon_protocol::auth::random_fill(&mut b).map_err(|e| Error::io("read /dev/urandom", e))?;
    Ok(u32::from_ne_bytes(b))
}

/// A random context id for kernel vsock, outside the reserved 0..=2 and `u32::MAX` (any). Not
/// derived from the sandbox id, which other users can see: a guessable CID is half of what an
/// unprivileged host user needs to reach an agent (the pod's key is the other half).
fn kernel_cid() -> Result<u32> {
    Ok(3 + random_u32()? % (u32::MAX - 3))
}

#[async_trait]
impl Vmm for QemuVm {
    fn agent_endpoint(&self) -> &VsockEndpoint {
        &self.endpoint
    }

    fn console_log(&self) -> PathBuf {
        self.dir.console_log()
    }

    fn pids(&self) -> Vec<(&'static str, u32)> {
        let late = self.late_share.as_ref().and_then(|s| s.pid());
        [&self.qemu, &self.virtiofsd, &self.vsockd]
            .into_iter()
            .flatten()
            .map(|d| (d.name, d.pid()))
            .chain(late.map(|pid| (crate::virtiofsd::VIRTIOFSD, pid)))
            .collect()
    }

    fn exit_error(&mut self) -> Option<Error> {
        // While booting (no supervisor yet), a dead helper is the cause whatever QEMU did
        // after it: the guest can't come up without it, so the VM goes at once instead of
        // waiting for an agent that never answers. Once booted, the supervisor owns this.
        if self.supervisor.is_none() {
            if let Some(dead) = crate::daemon::first_exited([&mut self.virtiofsd, &mut self.vsockd])
            {
                self.kill();
                return Some(dead);
            }
        }
        let status = self.qemu.as_mut()?.try_exited()?;
        let helpers = crate::daemon::first_exited([&mut self.virtiofsd, &mut self.vsockd]);
        Some(
            self.dir
                .vm_exited("qemu.log", with_helpers(status, helpers)),
        )
    }

    async fn wait_exit(&mut self, timeout: Duration) -> bool {
        exited_within(self.qemu.as_mut(), timeout).await
    }

    fn kill(&mut self) {
        if let Some(q) = self.qemu.as_mut() {
            q.kill();
        }
    }

    fn nic_hotplug(&self) -> Option<Arc<dyn crate::NicHotplug>> {
        let h = self.hotplug.clone()?;
        (self.hotplug_slots > 0).then_some(h as Arc<dyn crate::NicHotplug>)
    }

    fn disk_hotplug(&self) -> Option<Arc<dyn crate::DiskHotplug>> {
        self.disks.clone().map(|d| d as Arc<dyn crate::DiskHotplug>)
    }

    fn ram_cloned(&self) -> bool {
        self.ram_cloned
    }

    fn restored_from_template(&self) -> bool {
        self.restored_from.is_some()
    }

    fn template_console_log(&self) -> Option<PathBuf> {
        self.restored_from.as_ref().map(|d| d.join("console.log"))
    }

    fn share_hotplug(&self) -> Option<Arc<dyn crate::ShareHotplug>> {
        self.late_share
            .clone()
            .map(|s| s as Arc<dyn crate::ShareHotplug>)
    }

    async fn stop(&mut self) -> Result<()> {
        // Keep going after an error: every process is reaped and the directory removed
        // whatever happened to the others; the first error is reported.
        let mut first: Option<Error> = None;
        if let Some(s) = self.supervisor.take() {
            s.stop();
        }
        if let Some(mut q) = self.qemu.take() {
            if q.try_exited().is_none() {
                if let Some(qmp) = self.qmp.take() {
                    let quit = async { qmp.lock().await.quit().await };
                    if let Ok(Err(e)) = tokio::time::timeout(STOP_GRACE, quit).await {
                        log::debug!("QMP quit: {e}");
                    }
                }
                if tokio::time::timeout(STOP_GRACE, q.wait()).await.is_err() {
                    log::warn!("QEMU (pid {}) did not quit; killing it", q.pid());
                }
            }
            if let Err(e) = q.stop(STOP_GRACE).await {
                first.get_or_insert(e);
            }
        }
        self.qmp = None;
        self.hotplug = None;
        self.disks = None;
        // QEMU is gone: the relay reads what is left and ends.
        if let Some(c) = self.console.take() {
            c.finish(STOP_GRACE).await;
        }
        for mut d in [self.virtiofsd.take(), self.vsockd.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = d.stop(STOP_GRACE).await {
                first.get_or_insert(e);
            }
        }
        if let Some(s) = self.late_share.take() {
            if let Err(e) = s.stop().await {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = self.dir.remove() {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}
