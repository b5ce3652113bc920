//! A sandbox is one VM with a connected agent. Booting is all-or-nothing: if any step fails,
//! the VM and its helpers are stopped before the error is returned.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use cocoon_protocol::agent::{
    CheckRequest, GuestDetailsRequest, GuestDetailsResponse, RefreshRequest, ShutdownRequest,
};
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
pub use cocoon_protocol::StdioKind;
use cocoon_protocol::{ProcessRef, StdioHello, AGENT_PORT, API_VERSION, READY_PORT, STDIO_PORT};
use tokio::io::AsyncWriteExt;
use ttrpc::context;
use ttrpc::r#async::transport::Socket;
use ttrpc::r#async::Client;
use vmm_driver::vsock::BoxedStream;
use vmm_driver::{Config, VmSpec, Vmm};

use crate::network::{self, NetnsRequest, PodNetwork};
use crate::pod::{BootTimes, GuestLink, PodVm, StdioDialer, VmFactory, VmFacts};
use crate::{annotations, host_ns, Error, Result};

/// The deadline of the Shutdown call: a guest that does not answer at once is stopped.
const SHUTDOWN_CALL: Duration = Duration::from_secs(2);
/// NICs a pod whose netns the shim made may gain before its first Start (Docker: a network
/// given at `docker run`, plus any `docker network connect` before start).
const LATE_NICS: u8 = 4;
/// Bytes of host entropy a guest gets at boot (`RefreshRequest`): 512 bits, twice what the
/// kernel needs to count its RNG as seeded.
const REFRESH_ENTROPY: usize = 64;

/// Where boot time went, measured on the host from the start of [`Sandbox::boot`].
#[derive(Debug, Clone, Copy)]
pub struct BootTimings {
    /// Helpers and VMM running, QMP answering.
    pub vmm_started: Duration,
    /// The agent's vsock port accepted a connection.
    pub agent_connected: Duration,
    /// The agent answered its first call.
    pub agent_ready: Duration,
}

/// Opens stdio streams on a guest's vsock endpoint: the hello line, then the stream is the
/// process's stdin, stdout or stderr.
#[derive(Debug, Clone)]
pub struct VsockStdio {
    endpoint: vmm_driver::vsock::VsockEndpoint,
}

#[async_trait]
impl StdioDialer for VsockStdio {
    async fn open(&self, hello: &StdioHello) -> Result<BoxedStream> {
        let mut s = vmm_driver::vsock::connect_once(&self.endpoint, STDIO_PORT).await?;
        s.write_all(hello.to_line().as_bytes())
            .await
            .map_err(|e| Error::io("send the stdio hello", e))?;
        Ok(s)
    }
}

/// A running pod VM and its agent.
pub struct Sandbox {
    pub id: String,
    run_dir: std::path::PathBuf,
    vm: Box<dyn Vmm>,
    agent: AgentServiceClient,
    pub timings: BootTimings,
    /// The pod's taps and redirects, removed after the VM stopped.
    network: Option<PodNetwork>,
    /// Listeners in the pod netns that reach the guest's ports (CRI PortForward).
    ports: Option<network::PortMirror>,
    /// The pod netns the shim made (Docker, `ctr run`), and what appears in it by Start.
    own_netns: Option<network::OwnNetns>,
    late: Option<std::sync::Arc<network::LateAttach>>,
    /// How long agent calls and stdio opens may take (the config's `[agent]` timeouts).
    bounds: crate::guest::Bounds,
    /// The cgroup the VM's processes joined (`crate::placement`).
    placement: Option<crate::placement::Placement>,
    /// What `cocoon ps` shows of the VM.
    facts: VmFacts,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

/// One agent call while the pod boots, bounded by `limit` (`agent.call_timeout_ms`); a
/// failure carries the console's tail, since the guest may be what broke.
async fn boot_call<T>(
    vm: &dyn Vmm,
    call: &'static str,
    limit: Duration,
    fut: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| {
            Err(ttrpc::Error::Others(format!(
                "no answer within {limit:?} (agent.call_timeout_ms)"
            )))
        })
        .map_err(|source| Error::Agent {
            call,
            source,
            console_tail: vmm_driver::tail_lines(&vm.console_log(), 20),
        })
}

impl Sandbox {
    /// Boots the VM and waits until its agent answers.
    pub async fn boot(cfg: &Config, spec: &VmSpec) -> Result<Sandbox> {
        let t0 = Instant::now();
        let started_unix_ms = crate::process::now_nanos() / 1_000_000;
        let mut vm = vmm_driver::launch(cfg, spec).await?;
        let vmm_started = t0.elapsed();
        // The agent's time counts from the VMM it runs in: a launch that first made a VM
        // template, or tried one and fell back to a kernel boot, does not eat into it.
        match Self::connect(cfg, vm.as_mut(), t0, Instant::now()).await {
            Ok((agent, agent_connected)) => {
                let timings = BootTimings {
                    vmm_started,
                    agent_connected,
                    agent_ready: t0.elapsed(),
                };
                log::info!(
                    "sandbox {}: agent ready after {:?} ({timings:?})",
                    spec.id,
                    timings.agent_ready
                );
                let facts = VmFacts {
                    hypervisor: cfg.hypervisor,
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    from_template: vm.restored_from_template(),
                    ram_cloned: vm.ram_cloned(),
                    started_unix_ms,
                    console_log: vm.console_log(),
                    template_console_log: vm.template_console_log(),
                };
                Ok(Sandbox {
                    facts,
                    id: spec.id.clone(),
                    run_dir: spec.run_dir.clone(),
                    vm,
                    agent,
                    timings,
                    network: None,
                    ports: None,
                    own_netns: None,
                    late: None,
                    bounds: crate::guest::Bounds::from_config(&spec.id, cfg),
                    placement: None,
                })
            }
            Err(e) => {
                let e = Self::cause_of_a_broken_boot(vm.as_mut(), e).await;
                if let Err(stop) = vm.stop().await {
                    log::warn!("sandbox {}: cleanup after failed boot: {stop}", spec.id);
                }
                Err(e)
            }
        }
    }

    /// An agent call that failed while the VM came up: if a helper of the VM (or the VMM)
    /// died, that is the cause, and the error names it. A helper killed during the first calls
    /// breaks the agent's connection a moment before its exit can be seen, so the death is
    /// given up to [`crate::pod::VM_EXIT_GRACE`] to show; any other error returns as it is.
    async fn cause_of_a_broken_boot(vm: &mut dyn Vmm, e: Error) -> Error {
        if !matches!(e, Error::Agent { .. }) {
            return e;
        }
        crate::pod::within_exit_grace(|| std::future::ready(vm.exit_error()))
            .await
            .map_or(e, Error::Vmm)
    }

    async fn connect(
        cfg: &Config,
        vm: &mut dyn Vmm,
        t0: Instant,
        vmm_up: Instant,
    ) -> Result<(AgentServiceClient, Duration)> {
        let timeout =
            Duration::from_millis(cfg.agent.connect_timeout_ms).saturating_sub(vmm_up.elapsed());
        let stream = vmm_driver::connect_guest(vm, AGENT_PORT, Some(READY_PORT), timeout).await?;
        let connected = t0.elapsed();
        let agent = AgentServiceClient::new(Client::new(Socket::new(stream)));
        let limit = cfg.agent.call_timeout();
        let check = boot_call(
            vm,
            "Check",
            limit,
            agent.check(context::with_duration(limit), &CheckRequest::new()),
        )
        .await?;
        if check.api_version != API_VERSION {
            return Err(Error::ApiMismatch {
                agent: check.api_version,
                shim: API_VERSION,
            });
        }
        Self::refresh(&agent, vm, limit).await?;
        Ok((agent, connected))
    }

    /// Gives the guest the host's clock and fresh entropy before anything runs in it: a VM
    /// restored from a template starts with the template's clock and RNG state.
    async fn refresh(agent: &AgentServiceClient, vm: &dyn Vmm, limit: Duration) -> Result<()> {
        let mut entropy = vec![0u8; REFRESH_ENTROPY];
        cocoon_protocol::auth::random_fill(&mut entropy).map_err(|source| Error::Io {
            context: "read /dev/urandom for the guest".into(),
            source,
        })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let req = RefreshRequest {
            unix_time_ns: i64::try_from(now.as_nanos()).unwrap_or(i64::MAX),
            entropy,
            share: vm.share_hotplug().is_none(),
            ram_private: vm.ram_cloned(),
            ..Default::default()
        };
        let refresh = agent.refresh(context::with_duration(limit), &req);
        boot_call(vm, "Refresh", limit, refresh).await.map(drop)
    }

    /// Why the VM is gone, if its VMM exited (crash, kill, guest poweroff).
    pub fn vm_exit(&mut self) -> Option<String> {
        self.vm.exit_error().map(|e| e.to_string())
    }

    /// The generated agent client, for calls this type does not wrap.
    pub fn agent(&self) -> &AgentServiceClient {
        &self.agent
    }

    /// The VM underneath, e.g. to list its processes.
    pub fn vm(&self) -> &dyn Vmm {
        self.vm.as_ref()
    }

    /// The sandbox's runtime directory (`<state_dir>/<id>`).
    pub fn run_dir(&self) -> std::path::PathBuf {
        self.run_dir.clone()
    }

    /// The host-only directory whose tree the guest sees, read-only at the top, at
    /// `/run/cocoon/shared` (virtio-fs): container rootfs are mounted below it
    /// (`vmm_driver::share`).
    pub fn host_dir(&self) -> std::path::PathBuf {
        vmm_driver::share::host_dir(&self.run_dir)
    }

    /// Opens one stdio stream of a process, to be claimed by the CreateContainer or
    /// ExecProcess call that follows. `exec_id` empty means the container's init.
    pub async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: StdioKind,
    ) -> Result<BoxedStream> {
        let hello = StdioHello {
            process: ProcessRef::from_wire(container_id, exec_id),
            stream,
        };
        self.stdio().open(&hello).await
    }

    fn stdio(&self) -> VsockStdio {
        VsockStdio {
            endpoint: self.vm.agent_endpoint().clone(),
        }
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse> {
        let guest = PodVm::guest(self);
        let req = GuestDetailsRequest::new();
        let asked = guest.agent.guest_details(guest.ctx(), &req);
        match guest.call("GuestDetails", asked).await {
            Err(Error::Agent { source, .. }) => Err(self.agent_error("GuestDetails", source)),
            other => other,
        }
    }

    fn agent_error(&self, call: &'static str, source: ttrpc::Error) -> Error {
        Error::Agent {
            call,
            source,
            console_tail: vmm_driver::tail_lines(&self.vm.console_log(), 20),
        }
    }

    /// Asks the guest to power off, then stops and reaps everything, even if the guest did not
    /// cooperate. The sandbox is gone afterwards in every case.
    ///
    /// The agent answers once it has synced, so the VM is stopped right after the answer:
    /// nothing is left in the guest to lose, and waiting for its own power-off would cost the
    /// kernel's shutdown path (~85 ms under TCG) on every pod's delete.
    pub async fn shutdown(mut self) -> Result<()> {
        drop(self.ports.take());
        let asked = tokio::time::timeout(
            SHUTDOWN_CALL,
            self.agent.shutdown(
                context::with_duration(SHUTDOWN_CALL),
                &ShutdownRequest::new(),
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ttrpc::Error::Others(format!(
                "no answer within {SHUTDOWN_CALL:?}"
            )))
        });
        if let Err(e) = &asked {
            log::warn!(
                "sandbox {}: Shutdown call failed ({e}); stopping the VM",
                self.id
            );
        }
        let stopped = self.vm.stop().await;
        if let Some(p) = self.placement.take() {
            p.remove();
        }
        if let Some(net) = self.network.take() {
            net.teardown().await;
        }
        if let Some(late) = self.late.take() {
            late.teardown().await;
        }
        if let Some(ns) = self.own_netns.take() {
            ns.remove();
        }
        stopped?;
        Ok(())
    }
}

#[async_trait]
impl PodVm for Sandbox {
    fn guest(&self) -> GuestLink {
        GuestLink {
            agent: self.agent.clone(),
            stdio: std::sync::Arc::new(self.stdio()),
            network: self
                .late
                .clone()
                .map(|l| l as std::sync::Arc<dyn crate::guest::LateNetwork>),
            bounds: self.bounds.clone(),
        }
    }

    fn run_dir(&self) -> std::path::PathBuf {
        Sandbox::run_dir(self)
    }

    fn rootfs_dir(&self) -> std::path::PathBuf {
        self.host_dir()
    }

    fn host_pids(&self) -> Vec<(String, u32)> {
        self.vm
            .pids()
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect()
    }

    fn share_pid(&self) -> Option<u32> {
        self.vm
            .pids()
            .into_iter()
            .find(|(name, _)| *name == vmm_driver::VIRTIOFSD)
            .map(|(_, pid)| pid)
    }

    fn disk_hotplug(&self) -> Option<std::sync::Arc<dyn vmm_driver::DiskHotplug>> {
        self.vm.disk_hotplug()
    }

    fn share_hotplug(&self) -> Option<std::sync::Arc<dyn vmm_driver::ShareHotplug>> {
        self.vm.share_hotplug()
    }

    fn place_helpers(&self) {
        if let Some(p) = &self.placement {
            let pids: Vec<u32> = self.vm.pids().into_iter().map(|(_, p)| p).collect();
            p.add(&pids);
        }
    }

    fn facts(&self) -> VmFacts {
        self.facts.clone()
    }

    fn boot_times(&self) -> Option<BootTimes> {
        Some(BootTimes {
            vmm_started: self.timings.vmm_started,
            agent_ready: self.timings.agent_ready,
        })
    }

    fn exit_reason(&mut self) -> Option<String> {
        self.vm_exit()
    }

    fn reported_pid(&self) -> Option<u32> {
        self.vm.pids().first().map(|(_, pid)| *pid)
    }

    fn raise_oom_score(&self, adj: i32) {
        let pids: Vec<u32> = self.vm.pids().into_iter().map(|(_, p)| p).collect();
        crate::placement::raise_oom_score(&pids, adj);
    }

    fn cgroup(&self) -> Option<std::path::PathBuf> {
        self.placement.as_ref().map(|p| p.path.clone())
    }

    fn kill(&mut self) {
        log::warn!("sandbox {}: killing the VM", self.id);
        self.vm.kill();
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        Sandbox::shutdown(*self).await
    }
}

/// Boots real pod VMs from the cocoon config, sized from the first container's spec.
#[derive(Debug, Default)]
pub struct SandboxFactory;

#[async_trait]
impl VmFactory for SandboxFactory {
    fn layer_policy(&self) -> Option<crate::pod::LayerPolicy> {
        let cfg = Config::load().ok()?;
        match crate::pod::LayerPolicy::from_config(&cfg) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("rootfs over virtio-fs for every container: {e}");
                None
            }
        }
    }

    async fn boot(
        &self,
        sandbox_id: &str,
        spec: &serde_json::Value,
        share: bool,
    ) -> Result<Box<dyn PodVm>> {
        let cfg = Config::load().map_err(Error::Config)?;
        if let Ok(Some(p)) = crate::pod::LayerPolicy::from_config(&cfg) {
            // Images of layers no snapshot has any more, once per pod start, off the way.
            tokio::task::spawn_blocking(move || match p.cache.collect() {
                Ok(gone) if !gone.is_empty() => {
                    log::info!("layer cache: removed {} unused images", gone.len());
                }
                Ok(_) => {}
                Err(e) => log::warn!("layer cache: {e}"),
            });
        }
        let mut vm = VmSpec::from_config(&cfg, sandbox_id);
        vm.share = share || cfg.vm.share == vmm_driver::config::ShareMode::Always;
        vm.later_containers = annotations::takes_later_containers(spec);
        if vm.share && !share {
            log::info!("pod {sandbox_id}: VM with the virtio-fs share ([vm] share = \"always\")");
        }
        let size = annotations::vm_size(&cfg, spec).map_err(Error::InvalidArgument)?;
        vm.vcpus = size.vcpus;
        vm.memory_mib = size.memory_mib;
        let (network, own_netns) = match network::netns_request(spec) {
            // Refused earlier, at Create (`host_ns`); kept for a spec that reaches here
            // another way.
            NetnsRequest::Host => {
                return Err(Error::InvalidArgument(
                    host_ns::check(spec).err().unwrap_or_default(),
                ))
            }
            NetnsRequest::At(netns) => {
                let net = PodNetwork::setup(&netns).await?;
                vm.nics = net.nics();
                (Some(net), None)
            }
            NetnsRequest::New => {
                let ns = network::OwnNetns::create(&network::own::path_for(&vm.run_dir))?;
                vm.netns = Some(ns.path().to_owned());
                vm.hotplug_nics = LATE_NICS;
                (None, Some(ns))
            }
        };
        let mut sb = match Sandbox::boot(&cfg, &vm).await {
            Ok(sb) => sb,
            Err(e) => {
                if let Some(net) = network {
                    net.teardown().await;
                }
                if let Some(ns) = own_netns {
                    ns.remove();
                }
                return Err(Error::Boot(Box::new(e)));
            }
        };
        // The VM's processes are accounted where runc would have put the pod's.
        let pids: Vec<u32> = sb.vm.pids().into_iter().map(|(_, p)| p).collect();
        sb.placement = Some(crate::placement::Placement::join(
            crate::placement::cgroup_path(spec, sandbox_id),
            &pids,
        ));
        if let Some(ns) = own_netns {
            sb.late = Some(std::sync::Arc::new(network::LateAttach::new(
                ns.path().to_owned(),
                sb.vm.nic_hotplug(),
                sb.agent.clone(),
                sb.vm.agent_endpoint().clone(),
            )));
            sb.own_netns = Some(ns);
        }
        if let Some(net) = &network {
            if let Err(e) = net.configure_guest(&sb.agent).await {
                sb.network = network;
                if let Err(stop) = sb.shutdown().await {
                    log::warn!("sandbox {sandbox_id}: stopping after a network failure: {stop}");
                }
                return Err(e);
            }
        }
        sb.ports = network
            .as_ref()
            .map(|n| n.mirror_ports(sb.agent.clone(), sb.vm.agent_endpoint().clone()));
        sb.network = network;
        Ok(Box::new(sb))
    }
}
