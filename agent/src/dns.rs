//! DNS relay, guest side. Docker's embedded DNS (names of containers on a user-defined
//! network) listens on 127.0.0.11 in the container's network namespace on the host, and the
//! container's resolv.conf names it; a guest can't reach that address. When the host opens a
//! stream on `DNS_RELAY_PORT`, the agent serves 127.0.0.11:53 (UDP and TCP) in the guest,
//! whose network namespace is the pod's, and hands every query to the host as a frame
//! (`cocoon_protocol::dns`); the host asks the embedded DNS and the answer comes back with the
//! same id. The listeners live as long as that stream.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::host_stream::HostStream;
use cocoon_protocol::dns::{parse_header, DnsFrame, HEADER_LEN};
use cocoon_protocol::DNS_RELAY_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

/// Docker's embedded DNS address, which resolv.conf names.
const EMBEDDED_DNS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// Queries awaiting an answer at most; past that the oldest are forgotten (their clients
/// retry, as with any lost datagram).
const MAX_PENDING: usize = 1024;

/// Where an answer goes.
#[derive(Debug)]
enum Asker {
    Udp(SocketAddr),
    Tcp(oneshot::Sender<Vec<u8>>),
}

#[derive(Debug, Default)]
struct Pending {
    next: AtomicU32,
    waiting: Mutex<HashMap<u32, Asker>>,
}

impl Pending {
    fn add(&self, asker: Asker) -> u32 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut w = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.len() >= MAX_PENDING {
            if let Some(oldest) = w.keys().min().copied() {
                w.remove(&oldest);
            }
        }
        w.insert(id, asker);
        id
    }

    fn take(&self, id: u32) -> Option<Asker> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id)
    }
}

/// Accepts the host's relay streams (those with the pod's key), one at a time.
pub fn serve(gate: &Arc<crate::auth::Gate>) -> std::io::Result<()> {
    let mut admitted = gate.listen(DNS_RELAY_PORT)?;
    tokio::spawn(async move {
        while let Some(host) = admitted.recv().await {
            if let Err(e) = relay(host).await {
                log::warn!("DNS relay: {e}");
            }
        }
    });
    Ok(())
}

/// Serves 127.0.0.11:53 until the host's stream ends.
async fn relay(host: HostStream) -> std::io::Result<()> {
    let addr = SocketAddr::from((EMBEDDED_DNS, 53));
    let udp = Arc::new(UdpSocket::bind(addr).await?);
    let tcp = TcpListener::bind(addr).await?;
    log::info!("DNS relay: serving {addr} through the host");
    let (mut from_host, mut to_host) = tokio::io::split(host);
    let (tx, mut rx) = mpsc::channel::<DnsFrame>(64);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if to_host.write_all(&f.encode()).await.is_err() {
                break;
            }
        }
    });
    let pending = Arc::new(Pending::default());
    let answers = {
        let pending = pending.clone();
        let udp = udp.clone();
        async move {
            loop {
                let mut h = [0u8; HEADER_LEN];
                if from_host.read_exact(&mut h).await.is_err() {
                    return;
                }
                let (id, _, len) = parse_header(&h);
                let mut msg = vec![0u8; len];
                if from_host.read_exact(&mut msg).await.is_err() {
                    return;
                }
                match pending.take(id) {
                    Some(Asker::Udp(client)) if !msg.is_empty() => {
                        let _ = udp.send_to(&msg, client).await;
                    }
                    Some(Asker::Tcp(back)) => {
                        let _ = back.send(msg);
                    }
                    _ => {}
                }
            }
        }
    };
    let queries = async {
        let mut buf = vec![0u8; 65535];
        loop {
            tokio::select! {
                got = udp.recv_from(&mut buf) => {
                    let Ok((n, client)) = got else { continue };
                    let id = pending.add(Asker::Udp(client));
                    let frame = DnsFrame { id, tcp: false, msg: buf[..n].to_vec() };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
                conn = tcp.accept() => {
                    if let Ok((s, _)) = conn {
                        tokio::spawn(tcp_client(s, pending.clone(), tx.clone()));
                    }
                }
            }
        }
    };
    tokio::select! {
        () = answers => {}
        () = queries => {}
    }
    writer.abort();
    log::info!("DNS relay: the host's stream ended; {addr} closed");
    Ok(())
}

/// One TCP client: each length-prefixed query goes to the host, each answer back the same way.
async fn tcp_client(mut s: TcpStream, pending: Arc<Pending>, tx: mpsc::Sender<DnsFrame>) {
    loop {
        let Ok(len) = s.read_u16().await else { return };
        let mut msg = vec![0u8; usize::from(len)];
        if s.read_exact(&mut msg).await.is_err() {
            return;
        }
        let (back, answer) = oneshot::channel();
        let id = pending.add(Asker::Tcp(back));
        if tx.send(DnsFrame { id, tcp: true, msg }).await.is_err() {
            return;
        }
        let Ok(reply) = answer.await else { return };
        let Ok(rlen) = u16::try_from(reply.len()) else {
            return;
        };
        if reply.is_empty()
            || s.write_u16(rlen).await.is_err()
            || s.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}
