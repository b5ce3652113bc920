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

async fn exchange(socket: &Path, path: &str) -> anyhow::Result<Bytes> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future does the I/O; it ends when the sender is dropped.
    let io = tokio::spawn(conn);
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
