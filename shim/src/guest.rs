//! What the host needs to talk to a running guest: the agent client and a way to open stdio
//! streams. Cheap to clone, so the pod clones it out of its lock for every call; the real one
//! comes from `sandbox`, a fake one from the pod's unit tests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::StdioHello;
use vmm_driver::vsock::BoxedStream;

use crate::{Error, Result};

/// Opens one stdio stream of a process in the guest.
#[async_trait]
pub trait StdioDialer: Send + Sync + std::fmt::Debug {
    async fn open(&self, hello: &StdioHello) -> Result<BoxedStream>;
}

/// The pod's network as its runtime wires it after the task exists (Docker moves a veth into
/// the netns of the pid Create reported, then starts the task).
#[async_trait]
pub trait LateNetwork: Send + Sync + std::fmt::Debug {
    /// Hands the guest what appeared in the pod's netns. The first call does the work; later
    /// ones return at once.
    async fn attach(&self) -> Result<()>;
}

/// What the pod needs to talk to a running guest; cheap to clone out of the pod lock.
#[derive(Clone)]
pub struct GuestLink {
    pub agent: AgentServiceClient,
    pub stdio: Arc<dyn StdioDialer>,
    /// Set when the shim made the pod's netns itself ([`LateNetwork`]).
    pub network: Option<Arc<dyn LateNetwork>>,
    pub bounds: Bounds,
}

/// How long the host waits on a guest that should answer at once (`agent.call_timeout_ms`,
/// `agent.stdio_timeout_ms`), and the pod to name when it does not.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub pod: Arc<str>,
    pub call: Duration,
    pub stdio: Duration,
    /// Every call's latency and outcome, for `cocoon monitor`.
    pub calls: Arc<crate::metrics::CallStats>,
}

impl Bounds {
    pub fn from_config(pod: &str, cfg: &vmm_driver::Config) -> Bounds {
        Bounds {
            pod: pod.into(),
            call: cfg.agent.call_timeout(),
            stdio: cfg.agent.stdio_timeout(),
            calls: Arc::default(),
        }
    }

    fn timeout(&self, call: &'static str, after: Duration) -> Error {
        Error::Timeout {
            call,
            pod: self.pod.to_string(),
            after,
        }
    }
}

impl GuestLink {
    /// The ttrpc context of a call made through [`GuestLink::call`]. It carries no deadline of
    /// its own: the bound is `call`'s, which also covers the time queued on the connection, and
    /// two timers for one call would race to report it.
    pub fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::Context::default()
    }

    /// Runs one agent call within `agent.call_timeout_ms`, counted from before it is queued on
    /// the connection: ttrpc's own deadline starts only once the request was handed over, and a
    /// frozen guest stops reading long before that.
    pub async fn call<T>(
        &self,
        name: &'static str,
        call: impl Future<Output = ttrpc::Result<T>>,
    ) -> Result<T> {
        let t0 = std::time::Instant::now();
        let r = match tokio::time::timeout(self.bounds.call, call).await {
            Ok(r) => r.map_err(|e| Error::agent(name, e)),
            Err(_) => Err(self.bounds.timeout(name, self.bounds.call)),
        };
        self.bounds.calls.record(name, t0.elapsed(), r.is_ok());
        r
    }

    /// Opens one stdio stream within `agent.stdio_timeout_ms`.
    pub async fn open_stdio(&self, hello: &StdioHello) -> Result<BoxedStream> {
        tokio::time::timeout(self.bounds.stdio, self.stdio.open(hello))
            .await
            .unwrap_or_else(|_| Err(self.bounds.timeout("stdio open", self.bounds.stdio)))
    }
}

impl std::fmt::Debug for GuestLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLink")
            .field("stdio", &self.stdio)
            .finish_non_exhaustive()
    }
}
