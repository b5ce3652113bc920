//! Process stdio over dedicated vsock streams (see docs/architecture.md, "Stdio design").
//!
//! The host opens one connection to `STDIO_PORT` per stream and names it in a first line,
//! `<container> <exec or -> <stdin|stdout|stderr>\n`, before asking for the process. The
//! create/exec call then claims the streams it was told about.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use cocoon_protocol::STDIO_PORT;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// One stream of one process.
pub type Key = (String, String, String);

/// Streams that arrived and wait to be claimed.
#[derive(Debug, Default)]
pub struct StdioHub {
    pending: Mutex<HashMap<Key, VsockStream>>,
    arrived: Notify,
}

/// Parses a hello line (without the newline).
pub fn parse_hello(line: &str) -> Result<Key, String> {
    let parts: Vec<&str> = line.split(' ').collect();
    let [cid, eid, kind] = parts[..] else {
        return Err(format!(
            "bad stdio hello {line:?}: want `<container> <exec|-> <stream>`"
        ));
    };
    if !matches!(kind, "stdin" | "stdout" | "stderr") || cid.is_empty() || eid.is_empty() {
        return Err(format!("bad stdio hello {line:?}"));
    }
    let eid = if eid == "-" { "" } else { eid };
    Ok((cid.to_owned(), eid.to_owned(), kind.to_owned()))
}

impl StdioHub {
    /// Accepts stdio connections forever.
    pub async fn serve(self: std::sync::Arc<Self>) -> anyhow::Result<()> {
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STDIO_PORT))?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let hub = self.clone();
                        tokio::spawn(async move { hub.register(stream).await });
                    }
                    Err(e) => log::warn!("stdio accept: {e}"),
                }
            }
        });
        Ok(())
    }

    async fn register(&self, mut stream: VsockStream) {
        let mut line = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while line.len() < 512 {
                let b = stream.read_u8().await?;
                if b == b'\n' {
                    return Ok(());
                }
                line.push(b);
            }
            Err(std::io::Error::other("hello line too long"))
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            log::warn!("stdio connection without a hello line; closing it");
            return;
        }
        match parse_hello(&String::from_utf8_lossy(&line)) {
            Ok(key) => {
                log::debug!("stdio stream {key:?} connected");
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, stream);
                self.arrived.notify_waiters();
            }
            Err(e) => log::warn!("{e}"),
        }
    }

    /// Claims a stream, waiting up to `timeout` for it to connect.
    pub async fn take(
        &self,
        cid: &str,
        eid: &str,
        kind: &str,
        timeout: Duration,
    ) -> Result<VsockStream, String> {
        let key = (cid.to_owned(), eid.to_owned(), kind.to_owned());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
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
                    "the host never connected the {kind} stream of {cid}{}",
                    if eid.is_empty() {
                        String::new()
                    } else {
                        format!(" exec {eid}")
                    }
                ));
            }
        }
    }

    /// Drops streams of a process whose creation failed.
    pub fn discard(&self, cid: &str, eid: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(c, e, _), _| !(c == cid && e == eid));
    }
}

/// The stream's socket as a plain blocking fd, for a child process's stdio or a relay thread.
/// Consumes the stream: the runtime must not poll a socket that is now blocking.
pub fn into_blocking_fd(stream: VsockStream) -> std::io::Result<OwnedFd> {
    let fd = rustix::io::dup(stream.as_fd())?;
    drop(stream);
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_lines() {
        assert_eq!(
            parse_hello("c1 - stdout").unwrap(),
            ("c1".into(), "".into(), "stdout".into())
        );
        assert_eq!(
            parse_hello("c1 e2 stdin").unwrap(),
            ("c1".into(), "e2".into(), "stdin".into())
        );
        assert!(parse_hello("c1 - tty").is_err());
        assert!(parse_hello("c1 stdout").is_err());
        assert!(parse_hello("c1  stdout").is_err());
    }
}
