//! The pod network a runtime wires after Create (Docker): at the first Start the shim scans the
//! netns it made (`own.rs`), gives each addressed interface a tap and redirect as for CRI,
//! hot-plugs a NIC per tap into the running VM and has the agent configure the guest; where
//! Docker's embedded DNS listens in the netns (a user-defined network), the guest's
//! 127.0.0.11:53 is relayed to it (`dns.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use tokio::sync::Mutex;

use super::{DnsRelay, PodNetwork};
use crate::guest::LateNetwork;
use crate::{Error, Result};

/// What an attach set up.
#[derive(Debug)]
struct Wired {
    net: PodNetwork,
    dns: Option<DnsRelay>,
}

/// Where the attach stands: not yet, or done (with what it set up, if anything appeared).
#[derive(Debug)]
enum Attached {
    Not,
    Done(Option<Wired>),
}

/// Attaches a pod's late network once ([`LateNetwork`]); [`LateAttach::teardown`] removes it.
pub struct LateAttach {
    netns: PathBuf,
    hotplug: Option<Arc<dyn vmm_driver::NicHotplug>>,
    agent: AgentServiceClient,
    endpoint: vmm_driver::vsock::VsockEndpoint,
    state: Mutex<Attached>,
}

impl std::fmt::Debug for LateAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateAttach")
            .field("netns", &self.netns)
            .field("hotplug", &self.hotplug)
            .finish_non_exhaustive()
    }
}

impl LateAttach {
    pub fn new(
        netns: PathBuf,
        hotplug: Option<Arc<dyn vmm_driver::NicHotplug>>,
        agent: AgentServiceClient,
        endpoint: vmm_driver::vsock::VsockEndpoint,
    ) -> LateAttach {
        LateAttach {
            netns,
            hotplug,
            agent,
            endpoint,
            state: Mutex::new(Attached::Not),
        }
    }

    /// Removes the taps and redirects the attach made, if any.
    pub async fn teardown(&self) {
        let mut st = self.state.lock().await;
        if let Attached::Done(Some(w)) = std::mem::replace(&mut *st, Attached::Done(None)) {
            drop(w.dns);
            w.net.teardown().await;
        }
    }
}

#[async_trait]
impl LateNetwork for LateAttach {
    async fn attach(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        if matches!(*st, Attached::Done(_)) {
            return Ok(());
        }
        let net = PodNetwork::setup(&self.netns).await?;
        let nics = net.nics();
        if nics.is_empty() {
            *st = Attached::Done(None);
            return Ok(());
        }
        let plugged = async {
            let hotplug = self.hotplug.as_ref().ok_or_else(|| {
                Error::Network(format!(
                    "an interface appeared in the pod's network namespace ({}) after the VM \
                     started, and this hypervisor can't add a NIC to a running VM: use QEMU, or \
                     run the container without a network (docker run --network none)",
                    self.netns.display()
                ))
            })?;
            for nic in &nics {
                hotplug
                    .add_nic(nic)
                    .await
                    .map_err(|e| Error::Network(format!("hot-plug NIC {}: {e}", nic.mac)))?;
            }
            net.configure_guest(&self.agent).await?;
            DnsRelay::start_if_needed(&self.netns, &self.endpoint).await
        }
        .await;
        match plugged {
            Ok(dns) => {
                *st = Attached::Done(Some(Wired { net, dns }));
                Ok(())
            }
            Err(e) => {
                net.teardown().await;
                Err(e)
            }
        }
    }
}
