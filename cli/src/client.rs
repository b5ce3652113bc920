//! One request to a shim's admin endpoint (`shim/src/admin.rs`): HTTP/1.1 on its unix socket,
//! bounded as a whole, so that a shim that doesn't answer (stopped, wedged) costs its caller
//! at most `limit`.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// `GET path` on `socket`; the body of a 200 answer.
pub async fn get(socket: &Path, path: &str, limit: Duration) -> anyhow::Result<Bytes> {
    tokio::time::timeout(limit, exchange(socket, path))
        .await
        .map_err(|_| anyhow!("no answer within {} ms", limit.as_millis()))?
}

/// `GET path` on `socket`, writing the body of a 200 answer to stdout as it comes. Only the
/// answer's head is bounded by `limit`: a followed log goes on until the shim ends it. With
/// `cut_is_end`, a body cut short is its end: a followed pod's shim exits with its VM.
pub async fn stream(
    socket: &Path,
    path: &str,
    limit: Duration,
    cut_is_end: bool,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (mut sender, io) = connect(socket).await?;
    let req = Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .map_err(|_| anyhow!("no answer within {} ms", limit.as_millis()))??;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != StatusCode::OK {
        let text = body.collect().await?.to_bytes();
        bail!("{status}: {}", String::from_utf8_lossy(&text).trim());
    }
    let mut out = tokio::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(_) if cut_is_end => break,
            Err(e) => return Err(e.into()),
        };
        if let Ok(data) = frame.into_data() {
            out.write_all(&data).await?;
            out.flush().await?;
        }
    }
    drop(sender);
    io.abort();
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1 connection to `socket`, and the task that does its I/O.
async fn connect(socket: &Path) -> anyhow::Result<(Sender, tokio::task::JoinHandle<()>)> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future does the I/O; it ends when the sender is dropped.
    let io = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, io))
}

async fn exchange(socket: &Path, path: &str) -> anyhow::Result<Bytes> {
    let (mut sender, io) = connect(socket).await?;
    let req = Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let result = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
        }
        Ok(body)
    }
    .await;
    drop(sender);
    io.abort();
    result
}
