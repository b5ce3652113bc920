//! The agent API. Calls not implemented here answer ttrpc's NOT_FOUND "not supported" through
//! the generated trait defaults, so an older agent fails clearly instead of misbehaving.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent::{
    AddNeighboursRequest, CheckRequest, CheckResponse, CloseStdinRequest, CreateContainerRequest,
    CreateContainerResponse, DebugExecRequest, Empty, ExecProcessRequest, ExecProcessResponse,
    GetOOMEventRequest, GuestDetailsRequest, GuestDetailsResponse, GuestStatsRequest,
    GuestStatsResponse, Interface, ListProcessesRequest, ListProcessesResponse, ListenPortsRequest,
    ListenPortsResponse, OOMEvent, PauseContainerRequest, PutFilesRequest, ReadFileRequest,
    ReadFileResponse, RefreshRequest, RemoveContainerRequest, ResumeContainerRequest,
    ShutdownRequest, SignalProcessRequest, StartContainerRequest, StartContainerResponse,
    StatsContainerRequest, StatsContainerResponse, TtyWinResizeRequest, UpdateContainerRequest,
    UpdateInterfaceRequest, UpdateRoutesRequest, WaitProcessRequest, WaitProcessResponse,
};
use cocoon_protocol::agent_ttrpc::{create_agent_service, AgentService};
use cocoon_protocol::{ProcessRef, AGENT_PORT, API_VERSION};
use ttrpc::r#async::{Server, TtrpcContext};

use crate::containers::Manager;
use crate::init::{self, Booted};
use crate::network;

/// The agent's state.
#[derive(Debug)]
pub struct Agent {
    start_uptime_ms: u64,
    ready_uptime_ms: u64,
    booted: tokio::sync::watch::Receiver<Option<Booted>>,
    containers: Manager,
    /// Netlink in the guest's (the pod's) network namespace; None if it could not be opened.
    net: Option<rtnetlink::Handle>,
    /// Booted as a VM template (`cocoon_protocol::TEMPLATE_PARAM`).
    pub template: bool,
    /// Booted with the debug console (`cocoon_protocol::DEBUG_CONSOLE_PARAM`): DebugExec is
    /// served.
    pub debug_console: bool,
    /// The share, once mounted after bring-up (a VM that started without it).
    late_share: tokio::sync::OnceCell<()>,
}

impl Agent {
    pub fn new(
        start_uptime_ms: u64,
        booted: tokio::sync::watch::Receiver<Option<Booted>>,
        containers: Manager,
    ) -> Self {
        Agent {
            start_uptime_ms,
            ready_uptime_ms: 0,
            booted,
            containers,
            net: None,
            template: false,
            debug_console: false,
            late_share: tokio::sync::OnceCell::new(),
        }
    }

    fn net(&self) -> ttrpc::Result<&rtnetlink::Handle> {
        self.net.as_ref().ok_or_else(|| {
            net_status(network::NetError(
                "netlink is not available in the guest".into(),
            ))
        })
    }

    /// Containers live on the share: calls that touch them need it mounted.
    /// The share, mounted: at bring-up, or now, for a VM that started without it (the host
    /// plugged the device in just before; it appears a moment later).
    async fn need_share(&self) -> ttrpc::Result<()> {
        let Err(at_boot) = self.booted().await?.shared else {
            return Ok(());
        };
        let mounted = self
            .late_share
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(init::mount_share_when_plugged)
                    .await
                    .map_err(|e| format!("{e}"))?
                    .map_err(|e| format!("{e:#}"))
            })
            .await;
        mounted.map(drop).map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "the shared directory is not mounted in the guest: {e} (at boot: {at_boot})"
                ),
            ))
        })
    }

    /// Waits for bring-up to finish.
    async fn booted(&self) -> ttrpc::Result<Booted> {
        let mut rx = self.booted.clone();
        let b = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ttrpc::Error::Others("agent bring-up thread died".into()))?;
        Ok(b.clone().unwrap_or_else(|| Booted {
            loaded_modules: vec![],
            shared: Err("unknown".into()),
        }))
    }
}

fn mem_total_kib() -> u64 {
    crate::scrub::meminfo_kib("MemTotal").unwrap_or(0)
}

#[async_trait]
impl AgentService for Agent {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION,
            ..Default::default()
        })
    }

    async fn refresh(&self, _ctx: &TtrpcContext, req: RefreshRequest) -> ttrpc::Result<Empty> {
        if req.share {
            self.need_share().await?;
        }
        crate::refresh::apply(req.unix_time_ns, &req.entropy).map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, format!("{e:#}")))
        })?;
        log::debug!("clock and RNG refreshed from the host");
        if req.ram_private {
            crate::refresh::stop_free_page_reporting();
        }
        Ok(Empty::default())
    }

    async fn guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        let booted = self.booted().await?;
        let u =
            nix::sys::utsname::uname().map_err(|e| ttrpc::Error::Others(format!("uname: {e}")))?;
        Ok(GuestDetailsResponse {
            kernel_release: u.release().to_string_lossy().into_owned(),
            kernel_version: u.version().to_string_lossy().into_owned(),
            machine: u.machine().to_string_lossy().into_owned(),
            online_cpus: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            mem_total_kib: mem_total_kib(),
            agent_ready_uptime_ms: self.ready_uptime_ms,
            agent_start_uptime_ms: self.start_uptime_ms,
            shared_mount: if booted.shared.is_ok() || self.late_share.initialized() {
                init::SHARED_MOUNT.into()
            } else {
                String::new()
            },
            loaded_modules: booted.loaded_modules,
            ..Default::default()
        })
    }

    async fn guest_stats(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestStatsRequest,
    ) -> ttrpc::Result<GuestStatsResponse> {
        Ok(crate::guest_stats::read())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        if req.uses_share {
            self.need_share().await?;
        }
        crate::containers::provide_ephemeral(&req.ephemeral_volumes)?;
        crate::containers::reach_submounts(&req.submounts);
        let stdio = req.stdio.clone().unwrap_or_default();
        let rootfs = match req.layer_rootfs.as_ref() {
            Some(l) => crate::containers::RootfsFrom::Layers(l),
            None => crate::containers::RootfsFrom::Share(&req.rootfs),
        };
        let pid = self
            .containers
            .create(&req.container_id, &req.oci_spec_json, rootfs, &stdio)
            .await?;
        Ok(CreateContainerResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let pid = self.containers.start(&req.container_id).await?;
        Ok(StartContainerResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id).await?;
        Ok(Empty::default())
    }

    async fn read_file(
        &self,
        _ctx: &TtrpcContext,
        req: ReadFileRequest,
    ) -> ttrpc::Result<ReadFileResponse> {
        Ok(ReadFileResponse {
            data: crate::containers::read_file(&req.name, req.max_bytes)?,
            ..Default::default()
        })
    }

    async fn put_files(&self, _ctx: &TtrpcContext, req: PutFilesRequest) -> ttrpc::Result<Empty> {
        crate::containers::put_files(&req)?;
        Ok(Empty::default())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let stdio = req.stdio.clone().unwrap_or_default();
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json, &stdio)
            .await?;
        Ok(ExecProcessResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn debug_exec(
        &self,
        _ctx: &TtrpcContext,
        req: DebugExecRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        if !self.debug_console {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::PERMISSION_DENIED,
                "this VM was booted without the debug console ([debug] console = true on the \
                 host applies to pods started after it is set)",
            )));
        }
        let stdio = req.stdio.clone().unwrap_or_default();
        let pid = self
            .containers
            .debug_exec(&req.exec_id, &req.args, &stdio)
            .await?;
        Ok(ExecProcessResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let p = ProcessRef::from_wire(&req.container_id, &req.exec_id);
        self.containers.signal(&p, req.signal, req.all).await?;
        Ok(Empty::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let p = ProcessRef::from_wire(&req.container_id, &req.exec_id);
        let (status, at) = self.containers.wait(&p).await?;
        Ok(WaitProcessResponse {
            status,
            exited_at_unix_nanos: at,
            ..Default::default()
        })
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let p = ProcessRef::from_wire(&req.container_id, &req.exec_id);
        self.containers.resize(&p, req.rows, req.cols)?;
        Ok(Empty::default())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        let p = ProcessRef::from_wire(&req.container_id, &req.exec_id);
        self.containers.close_stdin(&p)?;
        Ok(Empty::default())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self.containers.pids(&req.container_id)?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        Ok(self.containers.stats(&req.container_id)?)
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.resources_json)?;
        Ok(Empty::default())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, true).await?;
        Ok(Empty::default())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, false).await?;
        Ok(Empty::default())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        let container_id = self.containers.next_oom().await?;
        Ok(OOMEvent {
            container_id,
            ..Default::default()
        })
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        // The NIC exists once the bring-up loaded virtio_net.
        self.booted().await?;
        let iface = req.interface.unwrap_or_default();
        network::update_interface(self.net()?, &iface)
            .await
            .map_err(net_status)
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Empty> {
        network::update_routes(self.net()?, &req.routes)
            .await
            .map_err(net_status)?;
        Ok(Empty::default())
    }

    async fn add_neighbours(
        &self,
        _ctx: &TtrpcContext,
        req: AddNeighboursRequest,
    ) -> ttrpc::Result<Empty> {
        network::add_neighbours(self.net()?, &req.neighbours)
            .await
            .map_err(net_status)?;
        Ok(Empty::default())
    }

    async fn listen_ports(
        &self,
        _ctx: &TtrpcContext,
        req: ListenPortsRequest,
    ) -> ttrpc::Result<ListenPortsResponse> {
        let known = req
            .known
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        let wait = std::time::Duration::from_millis(req.wait_ms.into());
        let ports = crate::forward::wait_change(&known, wait).await;
        Ok(ListenPortsResponse {
            ports: ports.into_iter().map(u32::from).collect(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        log::info!("shutdown requested; powering off");
        // Whatever the guest wrote is on its way to the host before the reply: the host stops
        // the VM as soon as it has the answer, without waiting for the guest's own power-off
        // (which costs ~85 ms of kernel shutdown under TCG).
        let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        // Reply first; the reply needs a moment on the wire before the guest disappears.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Err(e) = init::power_off() {
                log::error!("power off failed: {e:#}");
            }
        });
        Ok(Empty::default())
    }
}

fn net_status(e: network::NetError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, e.0))
}

/// Tells the host the API listens, by connecting to its READY_PORT. A host that polls instead
/// (kernel vsock) has no listener there; after a few seconds of trying, the agent gives up.
/// A template guest calls it only once bring-up finished (`main.rs`): that is after its
/// restore, when its vsock device has been hot-plugged.
pub async fn announce_ready() {
    use tokio::io::AsyncWriteExt;
    let addr =
        tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_HOST, cocoon_protocol::READY_PORT);
    for _ in 0..500 {
        if let Ok(mut s) = tokio_vsock::VsockStream::connect(addr).await {
            let _ = s.write_all(b"ready\n").await;
            let _ = s.shutdown(std::net::Shutdown::Write);
            log::debug!("announced readiness to the host");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    log::debug!(
        "no host listener on port {}; the host polls",
        cocoon_protocol::READY_PORT
    );
}

/// Binds the API on vsock, calls `bound`, and serves connections that open with the pod's key
/// until the guest powers off.
pub async fn serve(
    mut agent: Agent,
    gate: &Arc<crate::auth::Gate>,
    bound: impl FnOnce(),
) -> anyhow::Result<Server> {
    log::debug!("binding");
    let admitted = gate.listen(AGENT_PORT)?;
    let incoming = futures_util::stream::unfold(admitted, |mut rx| async move {
        rx.recv().await.map(|s| (Ok::<_, std::io::Error>(s), rx))
    });
    let server = Server::new().add_listener(ttrpc::r#async::transport::Listener::new(incoming));
    agent.ready_uptime_ms = crate::logger::uptime_ms();
    match network::connect() {
        Ok(h) => {
            if let Err(e) = network::loopback_up(&h).await {
                log::error!("{e}");
            }
            agent.net = Some(h);
        }
        Err(e) => log::error!("{e}"),
    }
    log::debug!("bound");
    bound();
    let mut server = server.register_service(create_agent_service(Arc::new(agent)));
    server.start().await?;
    Ok(server)
}
