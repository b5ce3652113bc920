//! The agent API. Calls not implemented here answer ttrpc's NOT_FOUND "not supported" through
//! the generated trait defaults, so an older agent fails clearly instead of misbehaving.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent::{
    CheckRequest, CheckResponse, Empty, GuestDetailsRequest, GuestDetailsResponse, ShutdownRequest,
};
use cocoon_protocol::agent_ttrpc::{create_agent_service, AgentService};
use cocoon_protocol::{API_VERSION, AGENT_PORT};
use ttrpc::r#async::{Server, TtrpcContext};

use crate::init;

/// What the agent learnt while bringing the guest up.
#[derive(Debug, Default)]
pub struct Agent {
    pub ready_uptime_ms: u64,
    pub shared_mounted: bool,
    pub loaded_modules: Vec<String>,
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
        let u = nix::sys::utsname::uname().map_err(|e| ttrpc::Error::Others(format!("uname: {e}")))?;
        Ok(GuestDetailsResponse {
            kernel_release: u.release().to_string_lossy().into_owned(),
            kernel_version: u.version().to_string_lossy().into_owned(),
            machine: u.machine().to_string_lossy().into_owned(),
            online_cpus: std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            mem_total_kib: mem_total_kib(),
            agent_ready_uptime_ms: self.ready_uptime_ms,
            shared_mount: if self.shared_mounted { init::SHARED_MOUNT.into() } else { String::new() },
            loaded_modules: self.loaded_modules.clone(),
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

/// Binds the API on vsock and serves until the guest powers off.
pub async fn serve(mut agent: Agent) -> anyhow::Result<Server> {
    agent.ready_uptime_ms = crate::logger::uptime_ms();
    let service = create_agent_service(Arc::new(agent));
    let mut server = Server::new()
        .bind(&format!("vsock://-1:{AGENT_PORT}"))?
        .register_service(service);
    server.start().await?;
    Ok(server)
}
