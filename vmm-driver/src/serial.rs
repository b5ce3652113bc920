//! The host end of the agent's virtio-serial channel (the guest end is the agent's
//! `serial.rs`): QEMU serves the port's chardev on a unix socket in the run directory; the
//! driver connects once and runs a yamux session over it, each stream of which stands for one
//! vsock connection. A stream opens with the port's number (four bytes, little-endian); what
//! follows is what a vsock connection to that port carries.
//!
//! The guest opens one stream of its own, to `READY_PORT`, once its API listens; callers wait
//! for it ([`SerialLink::wait_ready`]) before they open any, so that nothing is written before
//! a fresh guest session exists: a VM restored from a template starts one only when a host
//! connects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cocoon_protocol::READY_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, OnceCell};

use crate::error::{Error, Result};
use crate::stream::BoxedStream;

/// The channel of one VM: its chardev socket and, once connected, the session.
#[derive(Debug, Clone)]
pub struct SerialLink {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: PathBuf,
    session: OnceCell<Linked>,
}

struct Linked {
    opener: cocoon_mux::Opener,
    /// True once the guest said it listens; the sender goes when the session ends.
    ready: watch::Receiver<bool>,
}

impl std::fmt::Debug for Linked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linked")
            .field("ready", &*self.ready.borrow())
            .finish_non_exhaustive()
    }
}

impl PartialEq for SerialLink {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for SerialLink {}

impl SerialLink {
    /// The channel served on `socket` (nothing connects yet).
    pub fn new(socket: &Path) -> SerialLink {
        SerialLink {
            inner: Arc::new(Inner {
                socket: socket.to_owned(),
                session: OnceCell::new(),
            }),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    async fn linked(&self) -> Result<&Linked> {
        self.inner
            .session
            .get_or_try_init(|| async {
                let s = tokio::net::UnixStream::connect(&self.inner.socket)
                    .await
                    .map_err(|e| {
                        Error::io(format!("connect {}", self.inner.socket.display()), e)
                    })?;
                let (opener, mut inbound) = cocoon_mux::start(s, cocoon_mux::Mode::Client);
                let (tx, ready) = watch::channel(false);
                tokio::spawn(async move {
                    let tx = Arc::new(tx);
                    while let Some(mut stream) = inbound.recv().await {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            // The guest opens only its ready stream.
                            let mut port = [0u8; 4];
                            if stream.read_exact(&mut port).await.is_ok()
                                && u32::from_le_bytes(port) == READY_PORT
                            {
                                let _ = tx.send(true);
                            }
                        });
                    }
                    log::debug!("agent channel session ended");
                });
                Ok(Linked { opener, ready })
            })
            .await
    }

    /// Waits until the guest's agent announced itself on the channel. `Err` if the session
    /// ended first (the VM is gone); the caller bounds the wait.
    pub async fn wait_ready(&self) -> Result<()> {
        let mut ready = self.linked().await?.ready.clone();
        ready.wait_for(|r| *r).await.map(drop).map_err(|_| {
            Error::Handshake("the agent channel closed before the agent was ready".into())
        })
    }

    /// Opens a stream to guest port `port`.
    pub async fn open(&self, port: u32) -> Result<BoxedStream> {
        let mut s = self.linked().await?.opener.open().await.map_err(|e| {
            Error::io(
                format!("open a stream to guest port {port}"),
                std::io::Error::other(e),
            )
        })?;
        s.write_all(&port.to_le_bytes())
            .await
            .map_err(|e| Error::io(format!("name guest port {port}"), e))?;
        Ok(Box::pin(s))
    }
}
