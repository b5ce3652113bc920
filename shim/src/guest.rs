//! What the host needs to talk to a running guest: the agent client and a way to open stdio
//! streams. Cheap to clone, so the pod clones it out of its lock for every call; the real one
//! comes from `sandbox`, a fake one from the pod's unit tests.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::StdioHello;
use vmm_driver::vsock::BoxedStream;

use crate::Result;

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
}

impl std::fmt::Debug for GuestLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLink")
            .field("stdio", &self.stdio)
            .finish_non_exhaustive()
    }
}
