//! DNS relay, host side (the guest side is `agent/src/dns.rs`). Docker's embedded DNS, which
//! resolves container names on a user-defined network, listens on 127.0.0.11 in the pod's
//! netns on the host, where a guest can't reach it. The shim opens one stream to the agent's
//! `DNS_RELAY_PORT`; the agent serves 127.0.0.11:53 in the guest and sends each query over it,
//! and the shim asks the embedded DNS from a socket in the pod's netns (so Docker's own NAT
//! rules there apply, as for a runc container) and sends the answer back under the query's id.
//! A query that gets no answer within [`ASK_TIMEOUT`] is answered empty (the client retries).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_protocol::dns::{parse_header, DnsFrame, HEADER_LEN};
use cocoon_protocol::DNS_RELAY_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vmm_driver::vsock::{BoxedStream, VsockEndpoint};

use super::netns;
use crate::{Error, Result};

/// Docker's embedded DNS.
pub const EMBEDDED_DNS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// How long one query may wait for the embedded DNS.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries asked at once, at most: the guest is not trusted, and each query costs a socket
/// made on a thread in the pod's netns. Past this, queries wait their turn.
const MAX_IN_FLIGHT: usize = 64;

/// The running relay of one pod; stopped when dropped.
#[derive(Debug)]
pub struct DnsRelay {
    task: JoinHandle<()>,
}

impl Drop for DnsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsRelay {
    /// Starts relaying if Docker's embedded DNS listens in `netns`; `None` if it doesn't.
    pub async fn start_if_needed(netns: &Path, agent: &VsockEndpoint) -> Result<Option<DnsRelay>> {
        let path = netns.to_owned();
        let present =
            tokio::task::spawn_blocking(move || netns::udp_listener_on(&path, EMBEDDED_DNS))
                .await
                .map_err(|e| Error::Network(format!("the netns task failed: {e}")))??;
        if !present {
            return Ok(None);
        }
        let stream = vmm_driver::vsock::connect_once(agent, DNS_RELAY_PORT).await?;
        log::info!(
            "pod netns {}: relaying the guest's 127.0.0.11:53 to Docker's embedded DNS",
            netns.display()
        );
        Ok(Some(DnsRelay {
            task: tokio::spawn(run(stream, netns.to_owned())),
        }))
    }
}

async fn run(stream: BoxedStream, netns: PathBuf) {
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<DnsFrame>(64);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if to_guest.write_all(&f.encode()).await.is_err() {
                break;
            }
        }
    });
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let mut h = [0u8; HEADER_LEN];
        if from_guest.read_exact(&mut h).await.is_err() {
            break;
        }
        let (id, tcp, len) = parse_header(&h);
        let mut msg = vec![0u8; len];
        if from_guest.read_exact(&mut msg).await.is_err() {
            break;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (netns, tx) = (netns.clone(), tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let asked = tokio::time::timeout(ASK_TIMEOUT, ask(&netns, tcp, &msg)).await;
            let answer = match asked {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    log::debug!("DNS relay: {e}");
                    vec![]
                }
                Err(_) => vec![],
            };
            let _ = tx
                .send(DnsFrame {
                    id,
                    tcp,
                    msg: answer,
                })
                .await;
        });
    }
    writer.abort();
}

/// One query to the embedded DNS, over the protocol it came in on.
async fn ask(netns: &Path, tcp: bool, query: &[u8]) -> Result<Vec<u8>> {
    let to = SocketAddr::from((EMBEDDED_DNS, 53));
    let io = |what: &str, e: std::io::Error| Error::io(format!("DNS relay: {what}"), e);
    let path = netns.to_owned();
    if tcp {
        let std = tokio::task::spawn_blocking(move || netns::tcp_connect(&path, to))
            .await
            .map_err(|e| Error::Network(format!("the netns task failed: {e}")))??;
        let mut s = tokio::net::TcpStream::from_std(std).map_err(|e| io("adopt", e))?;
        let len = u16::try_from(query.len()).unwrap_or(u16::MAX);
        s.write_u16(len).await.map_err(|e| io("send", e))?;
        s.write_all(&query[..usize::from(len)])
            .await
            .map_err(|e| io("send", e))?;
        let n = s.read_u16().await.map_err(|e| io("receive", e))?;
        let mut answer = vec![0u8; usize::from(n)];
        s.read_exact(&mut answer)
            .await
            .map_err(|e| io("receive", e))?;
        return Ok(answer);
    }
    let std = tokio::task::spawn_blocking(move || netns::udp_socket(&path))
        .await
        .map_err(|e| Error::Network(format!("the netns task failed: {e}")))??;
    let s = tokio::net::UdpSocket::from_std(std).map_err(|e| io("adopt", e))?;
    s.send_to(query, to).await.map_err(|e| io("send", e))?;
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = s.recv_from(&mut buf).await.map_err(|e| io("receive", e))?;
        if from == to {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}
