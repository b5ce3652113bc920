//! A minimal QMP client: greeting, capabilities negotiation, commands matched to replies by id.
//! Asynchronous events can arrive between a command and its reply; they are kept, not mistaken
//! for the reply.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::error::{Error, Result};

/// One line QEMU sends on the QMP socket.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting {
        version: String,
    },
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event {
        name: String,
        data: Value,
    },
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "QMP")]
    qmp: Option<Value>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<RawError>,
    event: Option<String>,
    data: Option<Value>,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct RawError {
    class: String,
    desc: String,
}

/// Parses one QMP line.
pub fn parse_line(line: &str) -> Result<QmpMessage> {
    let raw: Raw = serde_json::from_str(line)
        .map_err(|e| Error::Qmp(format!("unparsable message {line:?}: {e}")))?;
    let id = raw.id.as_ref().and_then(Value::as_u64);
    if let Some(q) = raw.qmp {
        let v = &q["version"]["qemu"];
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        return Ok(QmpMessage::Greeting { version });
    }
    if let Some(value) = raw.ret {
        return Ok(QmpMessage::Return { id, value });
    }
    if let Some(e) = raw.error {
        return Ok(QmpMessage::Error {
            id,
            class: e.class,
            desc: e.desc,
        });
    }
    if let Some(name) = raw.event {
        return Ok(QmpMessage::Event {
            name,
            data: raw.data.unwrap_or(Value::Null),
        });
    }
    Err(Error::Qmp(format!("unknown message {line:?}")))
}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp<S> {
    stream: BufReader<S>,
    next_id: u64,
    /// Events seen while waiting for replies, oldest first.
    pub events: Vec<(String, Value)>,
    pub qemu_version: String,
    /// Bound of one exchange (`vmm.api_timeout_ms`): a stopped QEMU accepts the connection
    /// (the kernel does) and then never writes.
    limit: Duration,
    /// Set once an exchange timed out: a reply may still be on its way, so the session can't
    /// tell which answer belongs to which command any more.
    broken: bool,
}

/// How long one exchange may take unless the caller says otherwise.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(10);

impl Qmp<tokio::net::UnixStream> {
    pub async fn connect(path: &Path, limit: Duration) -> Result<Self> {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("connect QMP socket {}", path.display()), e))?;
        Qmp::handshake(s, limit).await
    }

    /// `getfd`: hands QEMU `fd` under `name`, as SCM_RIGHTS data on the QMP socket (a tap
    /// opened in the pod's netns, for `netdev_add`).
    pub async fn getfd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fd("getfd", json!({"fdname": name}), fd)
            .await
            .map(drop)
    }

    /// `add-fd`: puts `fd` in a new fd set (`opaque` says whose, in `query-fdsets`) and returns
    /// the set's id, for `/dev/fdset/<id>` as a block node's filename: the block layer opens
    /// only fd sets, never a `getfd` name. QEMU keeps its own copy of the fd, so the caller's
    /// may close.
    pub async fn add_fd(&mut self, fd: std::os::fd::BorrowedFd<'_>, opaque: &str) -> Result<u64> {
        let v = self
            .execute_with_fd("add-fd", json!({"opaque": opaque}), fd)
            .await?;
        v["fdset-id"]
            .as_u64()
            .ok_or_else(|| Error::Qmp(format!("add-fd: no fdset-id in {v}")))
    }

    /// Runs `command` with `fd` sent alongside, within the session's limit.
    async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value> {
        self.check_usable(command)?;
        let limit = self.limit;
        let sent =
            tokio::time::timeout(limit, self.with_fd_unbounded(command, arguments, fd)).await;
        self.bounded(command, sent)
    }

    async fn with_fd_unbounded(
        &mut self,
        command: &str,
        arguments: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::AsRawFd;
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"execute": command, "arguments": arguments, "id": id});
        let mut bytes = req.to_string().into_bytes();
        bytes.push(b'\n');
        let stream = self.stream.get_ref();
        let fds = [fd.as_raw_fd()];
        let what = format!("send QMP {command}");
        let sent = loop {
            stream
                .writable()
                .await
                .map_err(|e| Error::io(what.clone(), e))?;
            let tried = stream.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &[std::io::IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match tried {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::io(what, e)),
            }
        };
        // The fd went with the first byte; the rest of the line, if any, goes plainly.
        self.stream
            .get_mut()
            .write_all(&bytes[sent..])
            .await
            .map_err(|e| Error::io(what, e))?;
        self.reply(id, command).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Qmp<S> {
    /// Reads the greeting and leaves capabilities-negotiation mode; each exchange, this one
    /// included, gets `limit`.
    pub async fn handshake(stream: S, limit: Duration) -> Result<Self> {
        let mut q = Qmp {
            stream: BufReader::new(stream),
            next_id: 1,
            events: vec![],
            qemu_version: String::new(),
            limit,
            broken: false,
        };
        let greeting = tokio::time::timeout(limit, q.read()).await;
        match q.bounded("the QMP greeting", greeting)? {
            QmpMessage::Greeting { version } => q.qemu_version = version,
            other => return Err(Error::Qmp(format!("expected the greeting, got {other:?}"))),
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    fn check_usable(&self, command: &str) -> Result<()> {
        if self.broken {
            return Err(Error::Qmp(format!(
                "{command}: an earlier command timed out; this QMP session is no longer usable"
            )));
        }
        Ok(())
    }

    /// The outcome of a timed exchange; a timeout marks the session broken.
    fn bounded<T>(
        &mut self,
        what: &str,
        r: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        r.unwrap_or_else(|_| {
            self.broken = true;
            Err(Error::Timeout {
                call: format!("QMP {what}"),
                after: self.limit,
            })
        })
    }

    async fn read(&mut self) -> Result<QmpMessage> {
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .await
            .map_err(|e| Error::io("read from QMP", e))?;
        if n == 0 {
            return Err(Error::Qmp("QEMU closed the QMP connection".into()));
        }
        parse_line(line.trim_end())
    }

    /// Runs one command and returns its `return` value, within the session's limit.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.check_usable(command)?;
        let limit = self.limit;
        let r = tokio::time::timeout(limit, self.execute_unbounded(command, arguments)).await;
        self.bounded(command, r)
    }

    async fn execute_unbounded(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut bytes = req.to_string().into_bytes();
        bytes.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&bytes)
            .await
            .map_err(|e| Error::io(format!("send QMP {command}"), e))?;
        self.reply(id, command).await
    }

    /// Reads until the reply to request `id`, keeping the events that come first.
    async fn reply(&mut self, id: u64, command: &str) -> Result<Value> {
        loop {
            match self.read().await? {
                QmpMessage::Return { id: Some(i), value } if i == id => return Ok(value),
                QmpMessage::Error {
                    id: Some(i),
                    class,
                    desc,
                } if i == id => return Err(Error::Qmp(format!("{command}: {class}: {desc}"))),
                QmpMessage::Event { name, data } => self.events.push((name, data)),
                other => log::debug!("QMP: ignoring {other:?} while waiting for {command}"),
            }
        }
    }

    /// The VM's run state (`running`, `paused`, `shutdown`, ...).
    pub async fn status(&mut self) -> Result<String> {
        let v = self.execute("query-status", None).await?;
        v["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Qmp(format!("query-status: no status in {v}")))
    }

    /// Asks QEMU to exit now. QEMU may close the socket before or after replying; both are fine.
    pub async fn quit(&mut self) -> Result<()> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(Error::Qmp(m)) if m.contains("closed") => Ok(()),
            Err(Error::Io { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn parses_each_kind_of_line() {
        assert_eq!(
            parse_line(GREETING).unwrap(),
            QmpMessage::Greeting {
                version: "7.2.0".into()
            }
        );
        assert_eq!(
            parse_line(r#"{"return": {}, "id": 4}"#).unwrap(),
            QmpMessage::Return {
                id: Some(4),
                value: json!({})
            }
        );
        assert_eq!(
            parse_line(r#"{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#).unwrap(),
            QmpMessage::Error { id: Some(2), class: "CommandNotFound".into(), desc: "The command nope has not been found".into() }
        );
        assert_eq!(
            parse_line(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#).unwrap(),
            QmpMessage::Event { name: "SHUTDOWN".into(), data: json!({"guest": true, "reason": "guest-shutdown"}) }
        );
        assert!(parse_line("not json").is_err());
        assert!(parse_line(r#"{"something": 1}"#).is_err());
    }

    /// Plays QEMU's side from a script: for each expected request, optional events, then a reply.
    async fn fake_qemu(mut s: DuplexStream, script: Vec<(&'static str, Vec<String>)>) {
        s.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        let mut buf = BufReader::new(&mut s);
        for (expect, replies) in script {
            let mut line = String::new();
            buf.read_line(&mut line).await.unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["execute"], expect);
            let id = req["id"].as_u64().unwrap();
            for r in replies {
                let r = r.replace("$ID", &id.to_string());
                buf.get_mut()
                    .write_all(format!("{r}\n").as_bytes())
                    .await
                    .unwrap();
            }
        }
        let mut rest = Vec::new();
        let _ = buf.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn events_between_command_and_reply_are_kept() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(fake_qemu(
            b,
            vec![
                ("qmp_capabilities", vec![r#"{"return": {}, "id": $ID}"#.into()]),
                (
                    "query-status",
                    vec![
                        r#"{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}"#.into(),
                        r#"{"return": {"status": "stale"}, "id": 999}"#.into(),
                        r#"{"return": {"status": "running", "running": true}, "id": $ID}"#.into(),
                    ],
                ),
                (
                    "nope",
                    vec![r#"{"error": {"class": "CommandNotFound", "desc": "no such command"}, "id": $ID}"#.into()],
                ),
            ],
        ));
        let mut q = Qmp::handshake(a, DEFAULT_LIMIT).await.unwrap();
        assert_eq!(q.qemu_version, "7.2.0");
        assert_eq!(q.status().await.unwrap(), "running");
        assert_eq!(q.events.len(), 1);
        assert_eq!(q.events[0].0, "RESUME");
        let err = q.execute("nope", None).await.unwrap_err().to_string();
        assert!(
            err.contains("CommandNotFound") && err.contains("no such command"),
            "{err}"
        );
        drop(q);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn quit_tolerates_the_socket_closing() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut b = b;
            b.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let mut buf = BufReader::new(b);
            let mut line = String::new();
            buf.read_line(&mut line).await.unwrap();
            buf.get_mut()
                .write_all(b"{\"return\": {}, \"id\": 1}\n")
                .await
                .unwrap();
            line.clear();
            buf.read_line(&mut line).await.unwrap();
            assert!(line.contains("quit"));
            // QEMU exits without replying.
        });
        let mut q = Qmp::handshake(a, DEFAULT_LIMIT).await.unwrap();
        q.quit().await.unwrap();
        server.await.unwrap();
    }

    /// A stopped QEMU: the connection is accepted, nothing is ever written back. Both the
    /// handshake and a command give up within the limit, name what hung, and a session that
    /// timed out refuses further commands at once.
    #[tokio::test]
    async fn a_silent_qemu_costs_a_bounded_wait_that_names_the_command() {
        let limit = Duration::from_millis(200);
        let (a, _silent) = tokio::io::duplex(4096);
        let err = Qmp::handshake(a, limit).await.unwrap_err();
        assert!(
            matches!(&err, Error::Timeout { call, .. } if call == "QMP the QMP greeting"),
            "{err}"
        );

        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut b = b;
            b.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let mut buf = BufReader::new(b);
            let mut line = String::new();
            buf.read_line(&mut line).await.unwrap();
            buf.get_mut()
                .write_all(b"{\"return\": {}, \"id\": 1}\n")
                .await
                .unwrap();
            // Then silence, connection held open.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut q = Qmp::handshake(a, limit).await.unwrap();
        let t0 = std::time::Instant::now();
        let err = q.status().await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(
            err.to_string()
                .contains("QMP query-status got no answer within"),
            "{err}"
        );
        let again = q.execute("device_add", None).await.unwrap_err().to_string();
        assert!(again.contains("no longer usable"), "{again}");
        server.abort();
    }
}
