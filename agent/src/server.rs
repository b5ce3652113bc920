//! The agent API. Calls not implemented here answer ttrpc's NOT_FOUND "not supported" through
//! the generated trait defaults, so an older agent fails clearly instead of misbehaving.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent::{
    CheckRequest, CheckResponse, Empty, GuestDetailsRequest, GuestDetailsResponse, ShutdownRequest,
};
use cocoon_protocol::agent_ttrpc::{create_agent_service, AgentService};
use cocoon_protocol::{AGENT_PORT, API_VERSION};
use ttrpc::r#async::{Server, TtrpcContext};

use crate::init;

/// The outcome of the background bring-up (modules, virtio-fs share).
#[derive(Debug, Clone)]
pub struct Booted {
    pub loaded_modules: Vec<String>,
    /// Ok once the share is mounted, else why not.
    pub shared: Result<(), String>,
}

/// The agent's state.
#[derive(Debug)]
pub struct Agent {
    start_uptime_ms: u64,
    ready_uptime_ms: u64,
    booted: tokio::sync::watch::Receiver<Option<Booted>>,
}

impl Agent {
    pub fn new(start_uptime_ms: u64, booted: tokio::sync::watch::Receiver<Option<Booted>>) -> Self {
        Agent {
            start_uptime_ms,
            ready_uptime_ms: 0,
            booted,
        }
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
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
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
            shared_mount: if booted.shared.is_ok() {
                init::SHARED_MOUNT.into()
            } else {
                String::new()
            },
            loaded_modules: booted.loaded_modules,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        log::info!("shutdown requested; powering off");
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

/// Binds the API on vsock, calls `bound`, and serves until the guest powers off.
pub async fn serve(mut agent: Agent, bound: impl FnOnce()) -> anyhow::Result<Server> {
    log::debug!("binding");
    let server = Server::new().bind(&format!("vsock://-1:{AGENT_PORT}"))?;
    agent.ready_uptime_ms = crate::logger::uptime_ms();
    log::debug!("bound");
    bound();
    let mut server = server.register_service(create_agent_service(Arc::new(agent)));
    server.start().await?;
    Ok(server)
}
