//! A CRI PortForward client, the way `kubectl port-forward` reaches a pod through kubelet:
//! the PortForward call returns a URL on containerd's streaming server, and the stream there
//! is a WebSocket in kubelet's `v4.channel.k8s.io` protocol: every message starts with a
//! channel byte (0 data, 1 error for the first port), and the server first sends each channel
//! its port as two little-endian bytes.

use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1 as cri;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::cri::Cri;

const PROTOCOL: &str = "v4.channel.k8s.io";
const DATA: u8 = 0;
const ERROR: u8 = 1;

/// What came back over one forwarded connection.
#[derive(Debug, Default)]
pub struct Forwarded {
    /// Bytes on the data channel, after the port header.
    pub data: Vec<u8>,
    /// The error channel's text, after the port header (empty when the forward worked).
    pub error: String,
}

impl Cri {
    /// Opens a port-forward to `port` of `pod`, sends `request` on it and reads until the
    /// server closes the stream.
    pub async fn port_forward(
        &mut self,
        pod: &str,
        port: u16,
        request: &[u8],
    ) -> Result<Forwarded, String> {
        let url = self
            .client
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: vec![port.into()],
            })
            .await
            .map_err(|e| format!("PortForward: {e}"))?
            .into_inner()
            .url;
        exchange(&url, port, request).await
    }
}

async fn exchange(url: &str, port: u16, request: &[u8]) -> Result<Forwarded, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("unexpected stream URL {url}"))?;
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut req = format!("ws://{hostport}{path}?port={port}")
        .into_client_request()
        .map_err(|e| format!("{url}: {e}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        PROTOCOL.parse().map_err(|e| format!("{e}"))?,
    );
    let tcp = tokio::net::TcpStream::connect(hostport)
        .await
        .map_err(|e| format!("connect {hostport}: {e}"))?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(|e| format!("WebSocket handshake with {url}: {e}"))?;
    let mut frame = vec![DATA];
    frame.extend_from_slice(request);
    ws.send(Message::Binary(frame.into()))
        .await
        .map_err(|e| format!("send: {e}"))?;

    let mut out = Forwarded::default();
    let mut header_seen = [false, false];
    let read = async {
        while let Some(msg) = ws.next().await {
            let bytes = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                Err(e) => return Err(format!("read: {e}")),
            };
            let Some((&channel, mut payload)) = bytes.split_first() else {
                continue;
            };
            let Some(seen) = header_seen.get_mut(usize::from(channel)) else {
                return Err(format!("message on unknown channel {channel}"));
            };
            if !*seen {
                // The port header may share a message with the first data.
                let header = payload.get(..2).ok_or("short port header")?;
                if header != port.to_le_bytes() {
                    return Err(format!("port header {header:?} for port {port}"));
                }
                payload = &payload[2..];
                *seen = true;
            }
            match channel {
                DATA => out.data.extend_from_slice(payload),
                ERROR => out.error.push_str(&String::from_utf8_lossy(payload)),
                _ => unreachable!("checked above"),
            }
        }
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .map_err(|_| "no end of stream within 30 s".to_string())??;
    Ok(out)
}
