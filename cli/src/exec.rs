//! `cocoon exec SANDBOX -- CMD…`: a command in the pod's guest VM, outside every container
//! (the debug console). `POST /exec` on the pod's admin endpoint, upgraded to a stream of
//! `cocoon_protocol::console` frames: stdin and window sizes go out, output and the exit
//! status come back. The shim refuses unless the host enabled the console.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use cocoon_protocol::console::{read_frame, resize_payload, write_frame, Kind};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the shim's `POST /exec` takes (`shim/src/admin/exec.rs`).
#[derive(Debug, serde::Serialize)]
struct ExecRequest<'a> {
    args: &'a [String],
    tty: bool,
    stdin: bool,
}

/// Runs `args` in the guest; answers the exit status to leave with.
pub async fn run(
    socket: &Path,
    args: &[String],
    tty: bool,
    interactive: bool,
    limit: Duration,
) -> anyhow::Result<i32> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let body = serde_json::to_vec(&ExecRequest {
        args,
        tty,
        stdin: interactive,
    })?;
    let req = Request::post("/exec")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, "cocoon-console")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .map_err(|_| anyhow!("no answer within {} ms", limit.as_millis()))??;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        bail!("{status}: {}", String::from_utf8_lossy(&text).trim());
    }
    let io = TokioIo::new(hyper::upgrade::on(resp).await?);
    let (mut from_shim, mut to_shim) = tokio::io::split(io);

    let raw = if tty { RawTerminal::enter() } else { None };
    // One writer for every frame out: stdin, its end, and the window's sizes.
    let (tx, mut frames) = tokio::sync::mpsc::channel::<(Kind, Vec<u8>)>(16);
    tokio::spawn(async move {
        while let Some((kind, data)) = frames.recv().await {
            if write_frame(&mut to_shim, kind, &data).await.is_err() {
                break;
            }
        }
        // The write half stays open: closing it would tell the shim the client left.
        std::future::pending::<()>().await;
    });
    if tty {
        let size = || {
            rustix::termios::tcgetwinsize(std::io::stdout())
                .ok()
                .map(|ws| (Kind::Resize, resize_payload(ws.ws_row, ws.ws_col).to_vec()))
        };
        if let Some(frame) = size() {
            let _ = tx.send(frame).await;
        }
        // The local terminal's size changes follow the guest's (SIGWINCH).
        if let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    if let Some(frame) = size() {
                        if tx.send(frame).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    }
    if interactive {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send((Kind::StdinEnd, vec![])).await;
                        break;
                    }
                    Ok(n) => {
                        if tx.send((Kind::Stdin, buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let (mut out, mut err) = (tokio::io::stdout(), tokio::io::stderr());
    let status = loop {
        match read_frame(&mut from_shim).await? {
            Some((Kind::Stdout, data)) => {
                out.write_all(&data).await?;
                out.flush().await?;
            }
            Some((Kind::Stderr, data)) => {
                err.write_all(&data).await?;
                err.flush().await?;
            }
            Some((Kind::Exit, data)) => {
                let code: [u8; 4] = data
                    .as_slice()
                    .try_into()
                    .map_err(|_| anyhow!("bad exit frame"))?;
                break i32::from_be_bytes(code);
            }
            Some((Kind::Error, data)) => bail!("{}", String::from_utf8_lossy(&data)),
            Some(_) => {}
            None => bail!("the shim ended the session without the command's exit status"),
        }
    };
    drop(raw);
    Ok(status)
}

/// The local terminal in raw mode for a `-t` session, restored when dropped.
struct RawTerminal {
    saved: rustix::termios::Termios,
}

impl RawTerminal {
    /// None when stdin is not a terminal.
    fn enter() -> Option<RawTerminal> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let saved = tcgetattr(std::io::stdin()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(std::io::stdin(), OptionalActions::Now, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
