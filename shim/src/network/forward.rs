//! Port-forward, host side. containerd's CRI PortForward dials `localhost:<port>` inside the
//! pod netns on the host, where nothing of the guest is reachable: the tc redirect carries
//! only what crosses the veth. So the shim mirrors the guest: it asks the agent which TCP
//! ports listen there (`ListenPorts`, a long poll), holds a listener on 127.0.0.1:<port> in
//! the pod netns for each, and relays every connection over vsock to the agent, which dials
//! 127.0.0.1:<port> in the guest.
//!
//! Chosen over a DNAT of 127.0.0.1 (Kata's newer model) because the pod IP is local to the
//! pod netns on the host, so a DNAT to it never leaves the host side, and because it needs no
//! netfilter rules to install and remove. A new server is reachable once the next scan sees
//! it (the agent rescans every 250 ms while a poll is pending).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use cocoon_protocol::agent::ListenPortsRequest;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::FORWARD_PORT;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use vmm_driver::vsock::VsockEndpoint;

use super::netns;

/// The most ports mirrored per pod: the guest chooses the ports, and each costs the shim a
/// socket, so a hostile guest can't exhaust the shim's file descriptors.
pub const MAX_PORTS: usize = 128;
/// How long one `ListenPorts` poll is held open by the agent.
const WAIT_MS: u32 = 30_000;
/// Pause after a failed poll (the VM may be gone; the mirror ends with the pod).
const RETRY: Duration = Duration::from_secs(2);

/// A running mirror; dropping it closes every listener.
#[derive(Debug)]
pub struct PortMirror {
    task: JoinHandle<()>,
}

impl Drop for PortMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PortMirror {
    pub fn start(netns: PathBuf, agent: AgentServiceClient, endpoint: VsockEndpoint) -> Self {
        PortMirror {
            task: tokio::spawn(mirror(netns, agent, endpoint)),
        }
    }
}

/// Listeners by port; each task accepts for one port. Aborted (listener closed) on drop.
#[derive(Default)]
struct Listeners(BTreeMap<u16, JoinHandle<()>>);

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.abort();
        }
    }
}

/// The ports a guest reported that the shim will mirror: valid, and at most [`MAX_PORTS`].
pub fn wanted(reported: &[u32]) -> BTreeSet<u16> {
    reported
        .iter()
        .filter_map(|p| u16::try_from(*p).ok())
        .filter(|p| *p != 0)
        .take(MAX_PORTS)
        .collect()
}

async fn mirror(netns: PathBuf, agent: AgentServiceClient, endpoint: VsockEndpoint) {
    let mut known: Vec<u32> = vec![];
    let mut listeners = Listeners::default();
    loop {
        let req = ListenPortsRequest {
            known: known.clone(),
            wait_ms: WAIT_MS,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_duration(Duration::from_millis(u64::from(WAIT_MS) + 10_000));
        let reported = match agent.listen_ports(ctx, &req).await {
            Ok(r) => r.ports,
            Err(ttrpc::Error::RpcStatus(s))
                if s.code.enum_value() == Ok(ttrpc::Code::NOT_FOUND) =>
            {
                log::warn!("the agent can't list its ports: port-forward is unavailable");
                return;
            }
            Err(e) => {
                log::debug!("ListenPorts: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if reported.len() > MAX_PORTS {
            log::warn!(
                "the guest listens on {} ports; port-forward mirrors the first {MAX_PORTS}",
                reported.len()
            );
        }
        let wanted = wanted(&reported);
        known = reported;
        listeners.0.retain(|port, task| {
            let keep = wanted.contains(port);
            if !keep {
                log::debug!("port-forward: guest port {port} closed");
                task.abort();
            }
            keep
        });
        let new: Vec<u16> = wanted
            .iter()
            .copied()
            .filter(|p| !listeners.0.contains_key(p))
            .collect();
        if new.is_empty() {
            continue;
        }
        let path = netns.clone();
        let bound =
            match tokio::task::spawn_blocking(move || netns::bind_loopback(&path, new)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    log::warn!("port-forward: {e}");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Err(e) => {
                    log::warn!("port-forward: the bind task failed: {e}");
                    continue;
                }
            };
        for (port, l) in bound {
            match l.and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => {
                    log::debug!("port-forward: mirroring guest port {port}");
                    listeners
                        .0
                        .insert(port, tokio::spawn(accept(l, port, endpoint.clone())));
                }
                // Retried when the guest's ports next change.
                Err(e) => log::warn!(
                    "port-forward: can't listen on 127.0.0.1:{port} in {}: {e}",
                    netns.display()
                ),
            }
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, port: u16, endpoint: VsockEndpoint) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(relay(conn, port, endpoint.clone()));
            }
            Err(e) => {
                log::warn!("port-forward: accept on {port}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn relay(conn: tokio::net::TcpStream, port: u16, endpoint: VsockEndpoint) {
    let mut guest = match vmm_driver::vsock::connect_once(&endpoint, FORWARD_PORT).await {
        Ok(s) => s,
        Err(e) => {
            log::warn!("port-forward {port}: can't reach the agent: {e}");
            return;
        }
    };
    if let Err(e) = guest.write_all(format!("{port}\n").as_bytes()).await {
        log::warn!("port-forward {port}: {e}");
        return;
    }
    cocoon_protocol::forward::splice(conn, guest).await;
    log::debug!("port-forward {port}: connection ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_cannot_make_the_shim_mirror_without_bound() {
        let many: Vec<u32> = (1..=1000).collect();
        assert_eq!(wanted(&many).len(), MAX_PORTS);
        let bad = [0, 70_000, 8080, 8080];
        assert_eq!(wanted(&bad).into_iter().collect::<Vec<_>>(), vec![8080]);
    }
}
