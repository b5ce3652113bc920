//! Reaching a guest vsock port from the host.
//!
//! Hybrid vsock (vhost-device-vsock, Cloud Hypervisor, Firecracker) is a unix socket: the host
//! writes `CONNECT <port>\n` and the VMM answers `OK <host port>\n` once a guest listener
//! accepted. Until the guest listens, the VMM closes the connection, so callers retry.

use std::path::PathBuf;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use cocoon_protocol::auth::AgentKey;

use crate::error::{Error, Result};

/// How a guest's vsock is reached from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockTransport {
    /// Unix socket speaking the hybrid `CONNECT` protocol.
    Hybrid(PathBuf),
    /// Kernel AF_VSOCK with the guest's context id.
    Kernel { cid: u32 },
    /// The virtio-serial channel (`serial.rs`): a stream of its session per connection.
    Serial(crate::serial::SerialLink),
}

/// Where a guest's vsock is reached, and the key every connection opens with
/// (`cocoon_protocol::auth`): with kernel vsock any host user can connect to any guest port,
/// so reaching a port proves nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockEndpoint {
    pub transport: VsockTransport,
    /// `None` only for guests that expect no key (tests of the bare transport).
    pub key: Option<AgentKey>,
}

impl VsockEndpoint {
    /// The hybrid socket, if the transport is hybrid.
    pub fn hybrid_socket(&self) -> Option<&std::path::Path> {
        match &self.transport {
            VsockTransport::Hybrid(uds) => Some(uds),
            VsockTransport::Kernel { .. } | VsockTransport::Serial(_) => None,
        }
    }
}

pub use crate::stream::{BoxedStream, GuestStream};

/// The longest reply line accepted; real replies are `OK <u32>\n`.
const MAX_REPLY: usize = 32;

/// Checks a hybrid-vsock reply line (without its newline). Only the `OK ` prefix matters:
/// implementations differ in what follows it.
pub fn parse_connect_reply(line: &[u8]) -> Result<()> {
    if line.starts_with(b"OK ") {
        Ok(())
    } else {
        Err(Error::Handshake(format!(
            "expected `OK <port>`, got {:?}",
            String::from_utf8_lossy(line)
        )))
    }
}

/// One hybrid-vsock attempt. The reply is read byte by byte: a buffered reader would swallow
/// the first bytes of the protocol that follows.
pub async fn connect_hybrid(uds: &std::path::Path, port: u32) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|e| Error::io(format!("connect {}", uds.display()), e))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| Error::io("send CONNECT", e))?;
    let mut line = Vec::with_capacity(MAX_REPLY);
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| Error::io("read CONNECT reply", e))?;
        if b == b'\n' {
            break;
        }
        if line.len() == MAX_REPLY {
            return Err(Error::Handshake("reply line too long".into()));
        }
        line.push(b);
    }
    parse_connect_reply(&line)?;
    Ok(s)
}

/// One connection attempt to `port` on the guest; the endpoint's key goes first.
pub async fn connect_once(ep: &VsockEndpoint, port: u32) -> Result<BoxedStream> {
    let mut s: BoxedStream = match &ep.transport {
        VsockTransport::Hybrid(uds) => Box::pin(connect_hybrid(uds, port).await?),
        VsockTransport::Kernel { cid } => {
            let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, port))
                .await
                .map_err(|e| Error::io(format!("vsock connect {cid}:{port}"), e))?;
            Box::pin(s)
        }
        VsockTransport::Serial(link) => link.open(port).await?,
    };
    if let Some(key) = &ep.key {
        s.write_all(key.as_bytes())
            .await
            .map_err(|e| Error::io(format!("send the agent key on port {port}"), e))?;
    }
    Ok(s)
}

/// Retry delays: short at first, since a booted guest answers at once, then capped so a slow
/// boot is not hammered. The total wait is bounded by the caller's deadline.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(2),
            max: Duration::from_millis(10),
        }
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn reply_needs_the_ok_prefix() {
        parse_connect_reply(b"OK 1024").unwrap();
        parse_connect_reply(b"OK 1073741824").unwrap();
        assert!(parse_connect_reply(b"").is_err());
        assert!(parse_connect_reply(b"OK").is_err());
        assert!(parse_connect_reply(b"ERR no listener").is_err());
        assert!(parse_connect_reply(b"ok 1024").is_err());
    }

    #[test]
    fn backoff_grows_then_caps() {
        let v: Vec<_> = Backoff::default().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(v, vec![2, 4, 8, 10, 10, 10]);
    }

    /// A peer that answers the handshake and then sends protocol bytes in the same write:
    /// none of them may be lost to the handshake reader.
    #[tokio::test]
    async fn handshake_keeps_following_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 3\nHELLO").await.unwrap();
        });
        let mut s = connect_hybrid(&sock, 1024).await.unwrap();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HELLO");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn closed_connection_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        assert!(connect_hybrid(&sock, 1024).await.is_err());
    }

    /// Every connection opens with the endpoint's key, right after the hybrid handshake and
    /// before anything the caller sends.
    #[tokio::test]
    async fn the_key_goes_first_on_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let key = AgentKey::generate().unwrap();
        let want = key.clone();
        let peer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"CONNECT 1025\n");
            s.write_all(b"OK 3\n").await.unwrap();
            let mut got = [0u8; cocoon_protocol::auth::KEY_LEN];
            s.read_exact(&mut got).await.unwrap();
            assert!(want.matches(&got), "the first bytes were not the key");
            let mut hello = [0u8; 6];
            s.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello, b"hello\n");
        });
        let ep = VsockEndpoint {
            transport: VsockTransport::Hybrid(sock),
            key: Some(key),
        };
        let mut s = connect_once(&ep, 1025).await.unwrap();
        s.write_all(b"hello\n").await.unwrap();
        peer.await.unwrap();
    }
}
