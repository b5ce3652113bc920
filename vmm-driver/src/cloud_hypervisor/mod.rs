//! Cloud Hypervisor backend: the `cloud-hypervisor` process is started bare with an API socket
//! and driven entirely over its REST API (`vm.create`, `vm.boot`, …). It speaks hybrid vsock
//! itself, so the only helper is the per-VM virtiofsd.

pub mod api;
pub mod client;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use crate::accel::HostFacts;
use crate::boot::{check_image, kernel_cmdline};
use crate::config::{Accel, Config, VsockMode};
use crate::console::{ConsoleRelay, Output};
use crate::daemon::{
    exited_within, resolve_binary, tail_lines, wait_for_socket, Daemon, DAEMON_READY, STOP_GRACE,
};
use crate::error::{Error, Result};
use crate::run_dir::RunDir;
use crate::virtiofsd::{spawn_virtiofsd, VIRTIOFS_TAG};
use crate::vsock::{VsockEndpoint, VsockTransport};
use crate::{VmSpec, Vmm};
use api::{
    BalloonConfig, ConsoleConfig, ConsoleMode, CpusConfig, FsConfig, MemoryConfig, PayloadConfig,
    RngConfig, SerialConfig, VmConfig, VsockConfig,
};
pub use client::ApiClient;

/// The guest's context id; each VM has its own vsock socket, so every guest can be 3.
const GUEST_CID: u64 = 3;
const MIB: u64 = 1 << 20;

/// Whether Cloud Hypervisor can boot a guest here. It has no software emulation, so it needs
/// the same real KVM that `accel = "auto"` looks for; anything else is refused up front with
/// the way out, instead of a guest that hangs silently (what a PVM `/dev/kvm` gives).
pub fn check_host(cfg: &Config, host: &HostFacts) -> Result<()> {
    if cfg.vsock == VsockMode::Kernel {
        return Err(Error::ConfigValue {
            key: "vsock",
            message: "cloud-hypervisor proxies vsock over a unix socket (hybrid) only; use vsock = \"auto\" or \"hybrid\"".into(),
        });
    }
    let unusable = |reason: String| Error::HypervisorUnusable {
        name: "cloud-hypervisor",
        reason,
    };
    if cfg.accel == Accel::Tcg {
        return Err(unusable(
            "accel = \"tcg\" is set and Cloud Hypervisor has no software emulation".into(),
        ));
    }
    match host.kvm_blocker() {
        Some(why) => Err(unusable(format!("it needs KVM, and {why}"))),
        None => Ok(()),
    }
}

/// A Cloud Hypervisor VMM, its virtiofsd, and the client for its API socket.
#[derive(Debug)]
pub struct ChVm {
    dir: RunDir,
    endpoint: VsockEndpoint,
    api: ApiClient,
    vmm: Option<Daemon>,
    virtiofsd: Option<Daemon>,
    /// Stops the VM when virtiofsd dies (`supervise.rs`).
    supervisor: Option<crate::supervise::Supervisor>,
    /// Reads the serial port from CH's console socket into `console.log`, capped.
    console: Option<ConsoleRelay>,
}

impl ChVm {
    /// Checks the host and the image, starts the VMM and virtiofsd, then creates and boots the
    /// VM. A failure after the first process started tears down what was started.
    pub async fn launch(cfg: &Config, spec: &VmSpec) -> Result<ChVm> {
        check_host(cfg, &HostFacts::probe())?;
        if !spec.nics.is_empty() {
            return Err(Error::Unsupported {
                what: "pod networking (a tap NIC)",
                hypervisor: "cloud-hypervisor",
            });
        }
        let mut vm = ChVm::start(cfg, spec).await?;
        let booted = async {
            vm.api.create(&vm.vm_config(cfg, spec)).await?;
            vm.api.boot().await
        };
        match booted.await {
            Ok(()) => {
                // CH bound the console socket at vm.boot and buffers until a reader comes.
                vm.console = Some(ConsoleRelay::connect(
                    &vm.dir.console_socket(),
                    Output::new(vm.dir.console_log(), &spec.id, cfg),
                    DAEMON_READY,
                ));
                // CH made the hybrid vsock socket at vm.create.
                if let Some(uds) = vm.endpoint.hybrid_socket() {
                    if let Err(e) = crate::daemon::make_private(uds) {
                        return Err(vm.fail(e).await);
                    }
                }
                if let (Some(vmm), Some(fs)) = (&vm.vmm, &vm.virtiofsd) {
                    match crate::supervise::Supervisor::start(
                        &spec.id,
                        &vmm.watched(),
                        &[fs.watched()],
                    ) {
                        Ok(s) => vm.supervisor = Some(s),
                        Err(e) => log::warn!("VM {}: virtiofsd is not supervised: {e}", spec.id),
                    }
                }
                Ok(vm)
            }
            Err(e) => Err(vm.fail(e).await),
        }
    }

    /// Starts the bare VMM (no VM yet) and virtiofsd, and waits until `vmm.ping` answers.
    /// Does not check for KVM: the API itself works without it, which is what lets the API
    /// path be exercised on hosts that can't boot a guest. [`ChVm::launch`] is the normal way.
    pub async fn start(cfg: &Config, spec: &VmSpec) -> Result<ChVm> {
        // `make setup` can't install it (no Debian package), so say where it comes from.
        let ch_bin = resolve_binary(
            "cloud-hypervisor",
            "cloud_hypervisor",
            &cfg.paths.cloud_hypervisor,
        )
        .map_err(|_| Error::HypervisorUnusable {
            name: "cloud-hypervisor",
            reason: format!(
                "`{}` is not installed (Debian has no package: put a release binary from github.com/cloud-hypervisor/cloud-hypervisor on PATH, or set paths.cloud_hypervisor)",
                cfg.paths.cloud_hypervisor.display()
            ),
        })?;
        let fs_bin = resolve_binary("virtiofsd", "virtiofsd", &cfg.paths.virtiofsd)?;
        check_image(cfg)?;
        if !spec.share {
            log::info!(
                "VM {}: Cloud Hypervisor starts with the share all the same (it is not plugged in later here)",
                spec.id
            );
        }
        let dir = RunDir::create(&spec.run_dir)?;
        let mut vm = ChVm {
            endpoint: VsockEndpoint {
                transport: VsockTransport::Hybrid(dir.path("vsock.sock")),
                key: Some(dir.hand_key()?),
            },
            api: ApiClient::new(&dir.path("ch-api.sock"), cfg.vmm.api_timeout()),
            dir,
            vmm: None,
            virtiofsd: None,
            supervisor: None,
            console: None,
        };
        match vm.spawn(cfg, &ch_bin, &fs_bin, spec.netns.as_deref()).await {
            Ok(()) => Ok(vm),
            Err(e) => Err(vm.fail(e).await),
        }
    }

    async fn spawn(
        &mut self,
        cfg: &Config,
        ch_bin: &std::path::Path,
        fs_bin: &std::path::Path,
        netns: Option<&std::path::Path>,
    ) -> Result<()> {
        let (fs, fs_sock) = spawn_virtiofsd(cfg, &self.dir, fs_bin)?;
        self.virtiofsd = Some(fs);
        let mut ch = Command::new(ch_bin);
        ch.arg("--api-socket")
            .arg(format!("path={}", self.api.socket().display()));
        // Both start together; virtiofsd's socket only has to exist by vm.create.
        let vmm = self
            .vmm
            .insert(self.dir.spawn("cloud-hypervisor", ch, netns)?);
        wait_for_socket(vmm, self.api.socket(), DAEMON_READY).await?;
        if let Some(d) = self.virtiofsd.as_mut() {
            wait_for_socket(d, &fs_sock, DAEMON_READY).await?;
        }
        let ping = self.api.ping().await?;
        log::info!(
            "cloud-hypervisor {} (pid {}) is serving {}",
            ping.version,
            ping.pid.unwrap_or_default(),
            self.api.socket().display()
        );
        Ok(())
    }

    /// Tears down after a failed start. A VMM that died says more with its own output than
    /// the API error its death caused.
    async fn fail(&mut self, e: Error) -> Error {
        let e = match self.vmm.as_mut().and_then(Daemon::try_exited) {
            Some(status) => Error::DaemonExited {
                name: "cloud-hypervisor",
                status: status.to_string(),
                log_tail: tail_lines(&self.dir.path("cloud-hypervisor.log"), 20),
            },
            None => e,
        };
        if let Err(stop_err) = self.stop().await {
            log::warn!("cleanup after failed launch: {stop_err}");
        }
        e
    }

    /// The `vm.create` body for this VM: the same image, sizes and kernel command line the QEMU
    /// backend boots, with this VM's sockets. The serial port goes to a socket, not a file:
    /// CH would let a file grow without bound (`console.rs`).
    pub fn vm_config(&self, cfg: &Config, spec: &VmSpec) -> VmConfig {
        let size = u64::from(spec.memory_mib) * MIB;
        let max = u64::from(cfg.vm.max_memory_mib.max(spec.memory_mib)) * MIB;
        VmConfig {
            payload: PayloadConfig {
                kernel: Some(cfg.kernel.clone()),
                initramfs: Some(cfg.initramfs.clone()),
                cmdline: Some(kernel_cmdline(cfg, spec)),
            },
            cpus: Some(CpusConfig {
                boot_vcpus: spec.vcpus,
                max_vcpus: cfg.vm.max_vcpus.max(spec.vcpus),
            }),
            memory: Some(MemoryConfig {
                size,
                hotplug_size: (max > size).then_some(max - size),
                shared: true,
            }),
            serial: Some(SerialConfig {
                mode: ConsoleMode::Socket,
                file: None,
                socket: Some(self.dir.console_socket()),
            }),
            console: Some(ConsoleConfig {
                mode: ConsoleMode::Off,
            }),
            rng: Some(RngConfig {
                src: PathBuf::from("/dev/urandom"),
            }),
            balloon: Some(BalloonConfig {
                size: 0,
                free_page_reporting: true,
            }),
            vsock: Some(VsockConfig {
                cid: GUEST_CID,
                socket: self.dir.path("vsock.sock"),
            }),
            fs: Some(vec![FsConfig::new(
                VIRTIOFS_TAG,
                self.dir.path("virtiofsd.sock"),
            )]),
        }
    }

    /// The VMM's API: `vm.info`, pause/resume, resize and hot-add for callers that need them.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }
}

#[async_trait]
impl Vmm for ChVm {
    fn agent_endpoint(&self) -> &VsockEndpoint {
        &self.endpoint
    }

    fn console_log(&self) -> PathBuf {
        self.dir.console_log()
    }

    fn pids(&self) -> Vec<(&'static str, u32)> {
        [&self.vmm, &self.virtiofsd]
            .into_iter()
            .flatten()
            .map(|d| (d.name, d.pid()))
            .collect()
    }

    fn exit_error(&mut self) -> Option<Error> {
        // As for QEMU: during boot a dead virtiofsd is the cause; once booted, the
        // supervisor owns it.
        if self.supervisor.is_none() {
            if let Some(dead) = crate::daemon::first_exited([&mut self.virtiofsd]) {
                self.kill();
                return Some(dead);
            }
        }
        let status = self.vmm.as_mut()?.try_exited()?;
        let helpers = crate::daemon::first_exited([&mut self.virtiofsd]);
        Some(self.dir.vm_exited(
            "cloud-hypervisor.log",
            crate::daemon::with_helpers(status, helpers),
        ))
    }

    async fn wait_exit(&mut self, timeout: Duration) -> bool {
        exited_within(self.vmm.as_mut(), timeout).await
    }

    fn kill(&mut self) {
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.kill();
        }
    }

    async fn stop(&mut self) -> Result<()> {
        // Orderly first (guest off, then the VMM), each step bounded; then signals. Keep going
        // after an error so every process is reaped and the directory removed.
        let mut first: Option<Error> = None;
        if let Some(s) = self.supervisor.take() {
            s.stop();
        }
        if let Some(mut vmm) = self.vmm.take() {
            if vmm.try_exited().is_none() {
                best_effort("vm.shutdown", self.api.shutdown()).await;
                best_effort("vmm.shutdown", self.api.vmm_shutdown()).await;
                if tokio::time::timeout(STOP_GRACE, vmm.wait()).await.is_err() {
                    log::warn!(
                        "cloud-hypervisor (pid {}) did not exit; killing it",
                        vmm.pid()
                    );
                }
            }
            if let Err(e) = vmm.stop(STOP_GRACE).await {
                first.get_or_insert(e);
            }
        }
        // CH is gone: the relay reads what is left and ends.
        if let Some(c) = self.console.take() {
            c.finish(STOP_GRACE).await;
        }
        if let Some(mut d) = self.virtiofsd.take() {
            if let Err(e) = d.stop(STOP_GRACE).await {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = self.dir.remove() {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}

/// One orderly stop step: its failure (VM never booted, VMM already gone) only gets logged.
async fn best_effort(step: &str, call: impl std::future::Future<Output = Result<()>>) {
    match tokio::time::timeout(STOP_GRACE, call).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("{step} while stopping: {e}"),
        Err(_) => log::debug!("{step} while stopping: no answer within {STOP_GRACE:?}"),
    }
}

#[cfg(test)]
mod tests;
