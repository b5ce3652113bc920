//! Events to containerd that outlive a containerd restart.
//!
//! containerd may be stopped and started under running pods (an upgrade, a crash). An event
//! the shim publishes meanwhile, above all a TaskExit, must reach it once it is back: CRI marks
//! a container exited from that event, and nothing else tells it. The containerd-shim crate's
//! publisher retries an event five times over ~15 s and then drops it, and may reorder what it
//! retries. This forwarder keeps events in their order and retries the head of the queue,
//! reconnecting to containerd's ttrpc socket with a capped backoff, for as long as the shim
//! lives; only a full queue ([`QUEUE`] events, far more than a pod makes while containerd
//! restarts) loses one, and says so.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use tokio::sync::mpsc;
use ttrpc::r#async::transport::Socket;
use ttrpc::r#async::Client;

/// Events held while containerd is away.
pub const QUEUE: usize = 4096;
/// The longest pause between attempts while containerd is away.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// One Forward call; containerd answers at once when it is up.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The sending side; the forwarding task ends when it is dropped and the queue is empty.
#[derive(Debug, Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Envelope>,
    /// Events queued and not yet taken by containerd, for [`Forwarder::flush`].
    pending: Arc<AtomicUsize>,
}

impl Forwarder {
    /// Starts forwarding to containerd's ttrpc socket at `address` (a path, as containerd
    /// passes it in `TTRPC_ADDRESS`; a `unix://` prefix is taken off).
    pub fn spawn(address: &str) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE);
        let path = address
            .strip_prefix("unix://")
            .unwrap_or(address)
            .to_owned();
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(forward_all(path, rx, pending.clone()));
        Forwarder { tx, pending }
    }

    /// Waits up to `limit` for every queued event to reach containerd; says whether they did.
    /// The shim calls it before it exits: containerd 2.x, starting again, may tell a shim to
    /// go (a task that ended meanwhile) before its event socket answers.
    pub async fn flush(&self, limit: Duration) -> bool {
        let t0 = tokio::time::Instant::now();
        while self.pending.load(Ordering::SeqCst) > 0 {
            if t0.elapsed() >= limit {
                log::warn!(
                    "{} events not delivered to containerd within {limit:?} before the shim exits",
                    self.pending.load(Ordering::SeqCst)
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Queues `ev`; never waits for containerd.
    pub fn send(&self, ev: Envelope) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.tx.try_send(ev) {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            log::error!(
                "event {} lost: {QUEUE} events are already waiting for containerd",
                match &e {
                    mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) =>
                        ev.topic.as_str(),
                }
            );
        }
    }
}

async fn forward_all(path: String, mut rx: mpsc::Receiver<Envelope>, pending: Arc<AtomicUsize>) {
    let mut client: Option<EventsClient> = None;
    while let Some(ev) = rx.recv().await {
        let mut backoff = Duration::from_millis(20);
        let mut failures = 0u32;
        loop {
            if client.is_none() {
                client = connect(&path).await;
            }
            if let Some(c) = &client {
                match forward(c, &ev).await {
                    Ok(()) => break,
                    Err(e) => {
                        if failures == 0 {
                            log::warn!(
                                "event {} not delivered ({e}); holding it until containerd \
                                 answers on {path}",
                                ev.topic
                            );
                        }
                        client = None;
                    }
                }
            } else if failures == 0 {
                log::warn!(
                    "containerd is not answering on {path}; holding event {} until it is back",
                    ev.topic
                );
            }
            failures += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        pending.fetch_sub(1, Ordering::SeqCst);
        if failures > 0 {
            log::info!(
                "event {} delivered after {failures} failed attempts",
                ev.topic
            );
        }
    }
}

async fn connect(path: &str) -> Option<EventsClient> {
    let stream = tokio::net::UnixStream::connect(path).await.ok()?;
    Some(EventsClient::new(Client::new(Socket::new(stream))))
}

async fn forward(c: &EventsClient, ev: &Envelope) -> Result<(), String> {
    let req = ForwardRequest {
        envelope: MessageField::some(ev.clone()),
        ..Default::default()
    };
    let ctx = ttrpc::context::with_duration(CALL_TIMEOUT);
    match tokio::time::timeout(CALL_TIMEOUT, c.forward(ctx, &req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use containerd_shim_protos::api::Empty;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use ttrpc::r#async::{Server, TtrpcContext};

    /// containerd's Events service, recording the topics it gets.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    #[async_trait]
    impl Events for Recorder {
        async fn forward(&self, _: &TtrpcContext, r: ForwardRequest) -> ttrpc::Result<Empty> {
            self.0.lock().unwrap().push(r.envelope.topic.clone());
            Ok(Empty::new())
        }
    }

    fn serve(path: &std::path::Path, rec: &Recorder) -> Server {
        let _ = std::fs::remove_file(path);
        Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(create_events(Arc::new(rec.clone())))
    }

    fn envelope(topic: &str) -> Envelope {
        Envelope {
            topic: topic.into(),
            namespace: "default".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_sent_while_containerd_is_away_arrive_in_order_once_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("containerd.sock.ttrpc");
        let fwd = Forwarder::spawn(&sock.display().to_string());
        // containerd is down: nothing listens.
        for t in ["/tasks/start", "/tasks/exit", "/tasks/delete"] {
            fwd.send(envelope(t));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rec = Recorder::default();
        let mut server = serve(&sock, &rec);
        server.start().await.unwrap();
        let t0 = std::time::Instant::now();
        while rec.0.lock().unwrap().len() < 3 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *rec.0.lock().unwrap(),
            ["/tasks/start", "/tasks/exit", "/tasks/delete"]
        );
        assert!(fwd.flush(Duration::from_secs(1)).await);
        // containerd restarts: the next event reconnects, and a flush waits for it.
        server.shutdown().await.unwrap();
        fwd.send(envelope("/tasks/oom"));
        assert!(
            !fwd.flush(Duration::from_millis(300)).await,
            "nobody took it yet"
        );
        let mut server = serve(&sock, &rec);
        server.start().await.unwrap();
        assert!(fwd.flush(Duration::from_secs(5)).await);
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), "/tasks/oom");
        server.shutdown().await.unwrap();
    }
}
