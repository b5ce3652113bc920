//! Pod networking, host side. CNI has set up the pod's network namespace (a veth with the pod
//! IP, routes) before the sandbox container is created; the shim finds that netns in the
//! sandbox spec, gives every interface with an address a tap and a tc redirect (`tap.rs`),
//! hands the taps to the VMM as virtio-net NICs with the veths' MACs, and has the agent copy
//! the addresses, MTU, routes and neighbours onto them (`scan.rs` reads what to copy).
//!
//! netlink and tc go through `rtnetlink`/`netlink-packet-route` (typed messages, tc's u32 +
//! mirred included) rather than running `ip`/`tc`: no parsing of tool output, no dependency
//! on iproute2's version, and errors that say which step failed.

mod dns;
mod forward;
mod late;
mod netns;
pub mod own;
mod scan;
mod tap;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cocoon_protocol::agent as ag;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::protobuf::MessageField;

pub use dns::DnsRelay;
pub use forward::PortMirror;
pub use late::LateAttach;
pub use own::OwnNetns;
pub use scan::{mac_string, PodInterface, Scan};

use crate::{Error, Result};

/// Where a spec puts its container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRequest {
    /// No network namespace: the host's (refused: a VM can't share the host's interfaces).
    Host,
    /// A new one, unnamed (Docker, `ctr run`): the shim makes it (`own.rs`).
    New,
    /// The one at this path (CRI's, made by CNI).
    At(PathBuf),
}

/// What `spec` asks for its network namespace.
pub fn netns_request(spec: &serde_json::Value) -> NetnsRequest {
    let ns = spec["linux"]["namespaces"]
        .as_array()
        .and_then(|nss| nss.iter().find(|ns| ns["type"] == "network"));
    match ns.map(|ns| ns["path"].as_str().unwrap_or("")) {
        None => NetnsRequest::Host,
        Some("") => NetnsRequest::New,
        Some(p) => NetnsRequest::At(PathBuf::from(p)),
    }
}

/// One pod interface and the tap that carries it into the guest.
#[derive(Debug)]
struct Link {
    iface: ag::Interface,
    veth_index: u32,
    tap_name: String,
    tap: Arc<std::os::fd::OwnedFd>,
}

/// A pod's network as the shim set it up: removed again by [`PodNetwork::teardown`].
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    links: Vec<Link>,
    routes: Vec<ag::Route>,
    neighbours: Vec<ag::Neighbour>,
}

/// A tap's name in the pod netns: short enough for IFNAMSIZ, and says whose it is.
fn tap_name(n: usize) -> String {
    format!("tap{n}_cocoon")
}

impl PodNetwork {
    /// Reads the pod netns at `netns` and creates a tap + redirect per addressed interface. A
    /// netns with no addressed interface gives a pod without NICs (`lo` only). On failure,
    /// what was set up is removed.
    pub async fn setup(netns: &Path) -> Result<PodNetwork> {
        let path = netns.to_owned();
        let (links, scan) = tokio::task::spawn_blocking(move || {
            netns::run_in(&path, |h| async move {
                let scan = scan::scan(&h).await?;
                let mut links: Vec<Link> = vec![];
                for (n, pi) in scan.interfaces.iter().enumerate() {
                    let name = tap_name(n);
                    let made = tap::create(&h, &name, &pi.iface.name, pi.index, pi.iface.mtu).await;
                    match made {
                        Ok(t) => links.push(Link {
                            iface: pi.iface.clone(),
                            veth_index: pi.index,
                            tap_name: t.name,
                            tap: Arc::new(t.fd),
                        }),
                        Err(e) => {
                            remove_redirects(&h, &links).await;
                            return Err(e);
                        }
                    }
                }
                Ok((links, scan))
            })
        })
        .await
        .map_err(|e| Error::Network(format!("the netns task failed: {e}")))??;
        for l in &links {
            log::info!(
                "pod netns {}: {} ({}) -> {} -> guest NIC",
                netns.display(),
                l.iface.name,
                l.iface.hw_addr,
                l.tap_name
            );
        }
        Ok(PodNetwork {
            netns: netns.to_owned(),
            links,
            routes: scan.routes,
            neighbours: scan.neighbours,
        })
    }

    /// The NICs the VM gets, in order.
    pub fn nics(&self) -> Vec<vmm_driver::Nic> {
        self.links
            .iter()
            .map(|l| vmm_driver::Nic {
                tap: l.tap.clone(),
                mac: l.iface.hw_addr.clone(),
            })
            .collect()
    }

    /// Has the agent configure the guest: each interface (found by MAC), then routes, then
    /// neighbours.
    pub async fn configure_guest(&self, agent: &AgentServiceClient) -> Result<()> {
        let ctx = || ttrpc::context::with_duration(std::time::Duration::from_secs(30));
        for l in &self.links {
            let req = ag::UpdateInterfaceRequest {
                interface: MessageField::some(l.iface.clone()),
                ..Default::default()
            };
            agent
                .update_interface(ctx(), &req)
                .await
                .map_err(|e| Error::agent("UpdateInterface", e))?;
        }
        if !self.routes.is_empty() {
            let req = ag::UpdateRoutesRequest {
                routes: self.routes.clone(),
                ..Default::default()
            };
            agent
                .update_routes(ctx(), &req)
                .await
                .map_err(|e| Error::agent("UpdateRoutes", e))?;
        }
        if !self.neighbours.is_empty() {
            let req = ag::AddNeighboursRequest {
                neighbours: self.neighbours.clone(),
                ..Default::default()
            };
            agent
                .add_neighbours(ctx(), &req)
                .await
                .map_err(|e| Error::agent("AddNeighbours", e))?;
        }
        Ok(())
    }

    /// Starts mirroring the guest's listening ports into the pod netns for CRI PortForward.
    pub fn mirror_ports(
        &self,
        agent: AgentServiceClient,
        endpoint: vmm_driver::vsock::VsockEndpoint,
    ) -> PortMirror {
        PortMirror::start(self.netns.clone(), agent, endpoint)
    }

    /// Removes the redirects from the veths and closes the shim's tap fds; the taps go once
    /// the VMM's copies are closed too. A netns that is already gone (CNI removed it) took
    /// everything with it.
    pub async fn teardown(self) {
        if !self.netns.exists() || self.links.is_empty() {
            return;
        }
        let PodNetwork { netns, links, .. } = self;
        let path = netns.clone();
        let done = tokio::task::spawn_blocking(move || {
            netns::run_in(&path, |h| async move {
                remove_redirects(&h, &links).await;
                Ok(())
            })
        })
        .await;
        if let Ok(Err(e)) = done {
            log::warn!("pod netns {}: teardown: {e}", netns.display());
        }
    }
}

async fn remove_redirects(h: &rtnetlink::Handle, links: &[Link]) {
    for l in links {
        if let Err(e) = tap::remove_redirect(h, &l.iface.name, l.veth_index).await {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netns_comes_from_the_spec_path_only() {
        let cri = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}
        ]}});
        assert_eq!(
            netns_request(&cri),
            NetnsRequest::At(PathBuf::from("/var/run/netns/cni-1"))
        );
        let ctr = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_request(&ctr), NetnsRequest::New);
        let host = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        assert_eq!(netns_request(&host), NetnsRequest::Host);
        assert_eq!(netns_request(&serde_json::json!({})), NetnsRequest::Host);
        assert!(tap_name(0).len() <= 15);
    }
}
