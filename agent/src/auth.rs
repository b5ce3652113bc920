//! The guest side of `cocoon_protocol::auth`: every connection the host opens to one of our
//! vsock ports must open with the pod's key, which the host hands over as a QEMU fw_cfg item
//! (or, with a VMM that has none, at the top of the share). The
//! listeners here hand on only connections that did; the rest are dropped and logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_protocol::auth::{AgentKey, KEY_FILE, KEY_FW_CFG_PATH, KEY_LEN};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, OnceCell};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::host_stream::HostStream;

use crate::init::Booted;

/// How long a new connection may take to send the key. The host sends it with the connect.
const KEY_WAIT: Duration = Duration::from_secs(10);

/// Checks the key of every new host connection.
#[derive(Debug)]
pub struct Gate {
    booted: watch::Receiver<Option<Booted>>,
    /// Where the key may be, in order: the first that exists is the one.
    key_paths: Vec<std::path::PathBuf>,
    key: OnceCell<Option<AgentKey>>,
    /// Each listening port's channel of admitted connections.
    ports: Mutex<HashMap<u32, mpsc::Sender<HostStream>>>,
}

impl Gate {
    /// The key is read once bring-up is done (the fw_cfg module loaded, the share mounted),
    /// at the first connection: in a VM restored from a template that is after the restore, so
    /// the restoring QEMU's item is the one read.
    pub fn new(booted: watch::Receiver<Option<Booted>>) -> Arc<Gate> {
        Gate::reading(
            booted,
            vec![
                KEY_FW_CFG_PATH.into(),
                std::path::Path::new(crate::init::SHARED_MOUNT).join(KEY_FILE),
            ],
        )
    }

    fn reading(
        booted: watch::Receiver<Option<Booted>>,
        key_paths: Vec<std::path::PathBuf>,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            booted,
            key_paths,
            key: OnceCell::new(),
            ports: Mutex::default(),
        })
    }

    async fn key(&self) -> Option<&AgentKey> {
        self.key
            .get_or_init(|| async {
                let mut rx = self.booted.clone();
                let _ = rx.wait_for(Option::is_some).await;
                let at = self
                    .key_paths
                    .iter()
                    .find(|p| p.exists())
                    .unwrap_or(&self.key_paths[self.key_paths.len() - 1]);
                let path = at.display();
                match std::fs::read(at) {
                    Ok(b) => AgentKey::from_bytes(&b).or_else(|| {
                        log::error!("{path} is not a key ({} bytes); refusing the host", b.len());
                        None
                    }),
                    Err(e) => {
                        log::error!("no agent key at {path} ({e}); refusing every host connection");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Whether a new connection opens with the pod's key.
    pub async fn admit<S: tokio::io::AsyncRead + Unpin>(&self, s: &mut S, port: u32) -> bool {
        let mut got = [0u8; KEY_LEN];
        match tokio::time::timeout(KEY_WAIT, s.read_exact(&mut got)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                log::warn!("port {port}: a connection closed before its key ({e}); dropped");
                return false;
            }
            Err(_) => {
                log::warn!("port {port}: a connection sent no key within {KEY_WAIT:?}; dropped");
                return false;
            }
        }
        match self.key().await {
            Some(key) if key.matches(&got) => true,
            Some(_) => {
                log::warn!("port {port}: a connection with a wrong key; dropped");
                false
            }
            None => false,
        }
    }

    /// Listens on `port`, on vsock and on the serial channel (`serial.rs`, which hands its
    /// streams to [`Gate::offer`]); every connection that opens with the key comes out of the
    /// channel.
    pub fn listen(self: &Arc<Self>, port: u32) -> std::io::Result<mpsc::Receiver<HostStream>> {
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
        let (tx, rx) = mpsc::channel(16);
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port, tx);
        let gate = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        gate.offer(port, HostStream::Vsock(s));
                    }
                    Err(e) => {
                        log::warn!("port {port}: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Hands a new connection to `port`'s listener if it opens with the key, checked in a task
    /// of its own so that a peer that never sends its key holds up nobody else. False if
    /// nothing listens on `port`.
    pub fn offer(self: &Arc<Self>, port: u32, mut s: HostStream) -> bool {
        let tx = self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .cloned();
        let Some(tx) = tx else {
            return false;
        };
        let gate = self.clone();
        tokio::spawn(async move {
            if gate.admit(&mut s, port).await {
                let _ = tx.send(s).await;
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn booted() -> watch::Receiver<Option<Booted>> {
        watch::channel(Some(Booted {
            loaded_modules: vec![],
            shared: Ok(()),
        }))
        .1
    }

    async fn presenting(gate: &Gate, bytes: &[u8]) -> bool {
        let (mut host, mut guest) = tokio::io::duplex(256);
        host.write_all(bytes).await.unwrap();
        gate.admit(&mut guest, 1024).await
    }

    #[tokio::test]
    async fn only_a_connection_that_opens_with_the_key_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::generate().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), key.as_bytes()).unwrap();
        let gate = Gate::reading(
            booted(),
            vec![dir.path().join("fw_cfg"), dir.path().join(KEY_FILE)],
        );
        assert!(presenting(&gate, key.as_bytes()).await);
        let other = AgentKey::generate().unwrap();
        assert!(!presenting(&gate, other.as_bytes()).await);
        // A ttrpc frame straight away (a client that knows no key) is not a key either.
        assert!(!presenting(&gate, &[0u8; KEY_LEN]).await);
        // Too short, then the peer closes.
        let (mut host, mut guest) = tokio::io::duplex(256);
        host.write_all(&key.as_bytes()[..5]).await.unwrap();
        drop(host);
        assert!(!gate.admit(&mut guest, 1024).await);
    }

    #[tokio::test]
    async fn the_fw_cfg_item_wins_over_a_key_on_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let (fw, shared) = (AgentKey::generate().unwrap(), AgentKey::generate().unwrap());
        std::fs::write(dir.path().join("fw_cfg"), fw.as_bytes()).unwrap();
        std::fs::write(dir.path().join(KEY_FILE), shared.as_bytes()).unwrap();
        let gate = Gate::reading(
            booted(),
            vec![dir.path().join("fw_cfg"), dir.path().join(KEY_FILE)],
        );
        assert!(!presenting(&gate, shared.as_bytes()).await);
        assert!(presenting(&gate, fw.as_bytes()).await);
    }

    #[tokio::test]
    async fn without_a_key_file_nobody_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::reading(
            booted(),
            vec![dir.path().join("fw_cfg"), dir.path().join(KEY_FILE)],
        );
        let key = AgentKey::generate().unwrap();
        assert!(!presenting(&gate, key.as_bytes()).await);
    }
}
