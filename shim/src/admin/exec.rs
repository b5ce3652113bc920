//! `POST /exec`: the debug console (`cocoon exec`). The request's body names the command
//! ([`ExecRequest`]); the shim refuses with 403 unless `[debug] console = true`, starts the
//! command in the guest (`Pod::debug_exec`), answers `101 Switching Protocols`, and the
//! connection then carries the session in `cocoon_protocol::console` frames until the
//! process exits (an `Exit` frame with its status) or the client goes (the process is killed:
//! nothing the console started outlives it). Every session is logged, with its command.

use std::convert::Infallible;

use bytes::Bytes;
use cocoon_protocol::console::{parse_resize, read_frame, write_frame, Kind};
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{reply, Body};
use crate::pod::{DebugSession, Pod};

/// The protocol name in `Upgrade:`.
pub const UPGRADE: &str = "cocoon-console";

/// What `cocoon exec` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub args: Vec<String>,
    pub tty: bool,
    /// Whether the client sends stdin (`-i`).
    pub stdin: bool,
}

/// The setting's name in refusals.
pub const SETTING: &str = "[debug] console = true in /etc/cocoon/config.toml";

pub async fn serve(
    pod: Pod,
    enabled: bool,
    mut req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    if !enabled {
        log::warn!("debug console: refused for pod {} (it is off)", pod.id());
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!(
                "the debug console is off: it needs {SETTING} (see docs/security.md), and applies \
                 to pods started after it is set\n"
            )
            .into_bytes(),
        );
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("read the request: {e}")),
    };
    let ask: ExecRequest = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad(format!("bad request body: {e}")),
    };
    if ask.args.is_empty() {
        return bad("no command".into());
    }
    log::warn!(
        "debug console: pod {}: running {:?} (tty {}) in the guest",
        pod.id(),
        ask.args,
        ask.tty
    );
    let session = match pod.debug_exec(ask.args.clone(), ask.tty, ask.stdin).await {
        Ok(s) => s,
        Err(e) => {
            let status = match &e {
                crate::Error::Agent { source, .. } if is_denied(source) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_GATEWAY,
            };
            return reply(status, "text/plain", format!("{e}\n").into_bytes());
        }
    };
    let id = pod.id().to_owned();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => bridge(TokioIo::new(io), session).await,
            Err(e) => {
                log::warn!("debug console: pod {id}: upgrade failed: {e}");
                let _ = session.control().kill().await;
            }
        }
    });
    let mut r = Response::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(UPGRADE),
    );
    r
}

fn is_denied(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::PERMISSION_DENIED)
}

fn bad(msg: String) -> Response<Body> {
    reply(
        StatusCode::BAD_REQUEST,
        "text/plain",
        format!("{msg}\n").into_bytes(),
    )
}

/// Carries the session over the upgraded connection until the process exits or the client
/// leaves.
async fn bridge<IO>(io: IO, session: DebugSession)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let control = session.control();
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<(Kind, Vec<u8>)>(16);
    let mut outputs = Vec::new();
    outputs.push(tokio::spawn(pump(
        session.stdout,
        Kind::Stdout,
        out_tx.clone(),
    )));
    if let Some(err) = session.stderr {
        outputs.push(tokio::spawn(pump(err, Kind::Stderr, out_tx.clone())));
    }
    drop(out_tx);
    // Client → guest: stdin, its end, resizes. Ends when the client does.
    let input = {
        let control = control.clone();
        let mut stdin = session.stdin;
        tokio::spawn(async move {
            while let Ok(Some((kind, data))) = read_frame(&mut from_client).await {
                match kind {
                    Kind::Stdin => {
                        if let Some(s) = stdin.as_mut() {
                            if s.write_all(&data).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    Kind::StdinEnd => {
                        if let Some(mut s) = stdin.take() {
                            let _ = s.shutdown().await;
                        }
                    }
                    Kind::Resize => {
                        if let Some((rows, cols)) = parse_resize(&data) {
                            let _ = control.resize(rows, cols).await;
                        }
                    }
                    _ => {}
                }
            }
        })
    };
    let waited = tokio::spawn({
        let control = control.clone();
        async move { control.wait().await }
    });
    // Output until the process's streams end, or the client is gone: the client never
    // half-closes (it ends stdin with a frame), so its input ending means it left.
    let mut input = input;
    let mut client_gone = false;
    loop {
        tokio::select! {
            got = out_rx.recv() => match got {
                Some((kind, data)) => {
                    if write_frame(&mut to_client, kind, &data).await.is_err() {
                        client_gone = true;
                        break;
                    }
                }
                None => break,
            },
            _ = &mut input => {
                client_gone = true;
                break;
            }
        }
    }
    if client_gone {
        // Nothing the console started goes on unseen in the guest.
        log::warn!("debug console: the client left; killing the process");
        let _ = control.kill().await;
    }
    let last = match waited.await {
        Ok(Ok(status)) => (Kind::Exit, status.to_be_bytes().to_vec()),
        Ok(Err(e)) => (Kind::Error, e.to_string().into_bytes()),
        Err(e) => (Kind::Error, e.to_string().into_bytes()),
    };
    let _ = write_frame(&mut to_client, last.0, &last.1).await;
    let _ = to_client.shutdown().await;
    input.abort();
    for o in outputs {
        o.abort();
    }
}

/// Copies one output stream into frames.
async fn pump<R: AsyncRead + Unpin>(mut from: R, kind: Kind, tx: mpsc::Sender<(Kind, Vec<u8>)>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((kind, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}
