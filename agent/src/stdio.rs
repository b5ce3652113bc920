//! Process stdio over dedicated vsock streams (see docs/architecture.md, "Stdio design").
//!
//! The host opens one connection to `STDIO_PORT` per stream and names it in a first line,
//! `<container> <exec or -> <stdin|stdout|stderr>\n` ([`StdioHello`], shared with the host),
//! before asking for the process. The create/exec call then claims the streams it was told
//! about.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use crate::host_stream::HostStream;
use cocoon_protocol::process::MAX_HELLO_LEN;
use cocoon_protocol::{ProcessRef, StdioHello, StdioKind, STDIO_PORT};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::auth::Gate;

/// How long a new connection may take to send its hello line.
const HELLO_WAIT: Duration = Duration::from_secs(5);

/// Streams that arrived and wait to be claimed, by the hello line that named them.
#[derive(Debug, Default)]
pub struct StdioHub {
    pending: Mutex<HashMap<StdioHello, HostStream>>,
    arrived: Notify,
}

impl StdioHub {
    /// Accepts stdio connections (those with the pod's key) forever.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        gate: &std::sync::Arc<Gate>,
    ) -> anyhow::Result<()> {
        let mut admitted = gate.listen(STDIO_PORT)?;
        tokio::spawn(async move {
            while let Some(stream) = admitted.recv().await {
                let hub = self.clone();
                tokio::spawn(async move { hub.register(stream).await });
            }
        });
        Ok(())
    }

    async fn register(&self, mut stream: HostStream) {
        let Some(line) = read_hello(&mut stream).await else {
            log::warn!("stdio connection without a hello line; closing it");
            return;
        };
        match StdioHello::parse(&String::from_utf8_lossy(&line)) {
            Ok(hello) => {
                log::debug!(
                    "stdio stream {} of {} connected",
                    hello.stream.name(),
                    hello.process
                );
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(hello, stream);
                self.arrived.notify_waiters();
            }
            Err(e) => log::warn!("{e}"),
        }
    }

    /// Claims a stream, waiting up to `timeout` for it to connect.
    pub async fn take(
        &self,
        process: &ProcessRef,
        stream: StdioKind,
        timeout: Duration,
    ) -> Result<HostStream, String> {
        let key = StdioHello {
            process: process.clone(),
            stream,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the look-up, so an arrival between the two still wakes us.
            let notified = self.arrived.notified();
            if let Some(s) = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key)
            {
                return Ok(s);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "the host never connected the {} stream of {}{}",
                    stream.name(),
                    process.container_id,
                    match &process.exec_id {
                        None => String::new(),
                        Some(e) => format!(" exec {e}"),
                    }
                ));
            }
        }
    }

    /// Drops streams of a process whose creation failed.
    pub fn discard(&self, process: &ProcessRef) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|hello, _| hello.process != *process);
    }
}

/// The hello line without its newline, or None if the peer sent none in time.
pub(crate) async fn read_hello(stream: &mut HostStream) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let read = tokio::time::timeout(HELLO_WAIT, async {
        // Up to MAX_HELLO_LEN bytes before the newline: never less than the protocol allows.
        while line.len() < MAX_HELLO_LEN {
            let b = stream.read_u8().await?;
            if b == b'\n' {
                return Ok(());
            }
            line.push(b);
        }
        Err(std::io::Error::other("hello line too long"))
    })
    .await;
    matches!(read, Ok(Ok(()))).then_some(line)
}

/// The stream's socket as a plain blocking fd, for a child process's stdio or a relay thread.
/// Consumes the stream: the runtime must not poll a socket that is now blocking.
pub fn into_blocking_fd(stream: HostStream) -> std::io::Result<OwnedFd> {
    let fd = stream.into_socket()?.dup_socket()?;
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_that_never_connects_is_named_in_the_error() {
        let hub = StdioHub::default();
        let err = hub
            .take(
                &ProcessRef::exec("c1", "e2"),
                StdioKind::Stdin,
                Duration::ZERO,
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            "the host never connected the stdin stream of c1 exec e2"
        );
        let err = hub
            .take(&ProcessRef::init("c1"), StdioKind::Stdout, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err, "the host never connected the stdout stream of c1");
    }
}
