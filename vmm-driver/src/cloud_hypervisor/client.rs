//! The HTTP client for Cloud Hypervisor's API socket: one short HTTP/1.1 connection per call,
//! through hyper, so there is no connection state to lose when CH restarts or exits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::api::{
    DiskConfig, FsConfig, NetConfig, PciDeviceInfo, VmConfig, VmInfo, VmResize, VmmPingResponse,
};
use crate::error::{Error, Result};

/// A client for one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    /// Every call is answered in milliseconds by a healthy VMM; a stuck one must not stall the
    /// shim (`vmm.api_timeout_ms`).
    limit: Duration,
}

impl ApiClient {
    pub fn new(socket: &Path, limit: Duration) -> ApiClient {
        ApiClient {
            socket: socket.to_owned(),
            limit,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /vmm.ping`: the VMM is up and serving its API.
    pub async fn ping(&self) -> Result<VmmPingResponse> {
        self.get("vmm.ping").await
    }

    /// `PUT /vm.create`: the VM exists but does not run yet.
    pub async fn create(&self, config: &VmConfig) -> Result<()> {
        self.put("vm.create", Some(config)).await.map(drop)
    }

    pub async fn boot(&self) -> Result<()> {
        self.put_empty("vm.boot").await
    }

    pub async fn info(&self) -> Result<VmInfo> {
        self.get("vm.info").await
    }

    pub async fn pause(&self) -> Result<()> {
        self.put_empty("vm.pause").await
    }

    pub async fn resume(&self) -> Result<()> {
        self.put_empty("vm.resume").await
    }

    /// `PUT /vm.shutdown`: stops the guest; the VMM process stays.
    pub async fn shutdown(&self) -> Result<()> {
        self.put_empty("vm.shutdown").await
    }

    /// `PUT /vmm.shutdown`: the VMM process exits. Its reply may be cut short by the exit.
    pub async fn vmm_shutdown(&self) -> Result<()> {
        self.put_empty("vmm.shutdown").await
    }

    pub async fn resize(&self, resize: &VmResize) -> Result<()> {
        self.put("vm.resize", Some(resize)).await.map(drop)
    }

    /// Hot-adds a network device. `None` when CH cold-added it (VM not booted yet).
    pub async fn add_net(&self, net: &NetConfig) -> Result<Option<PciDeviceInfo>> {
        self.add("vm.add-net", net).await
    }

    pub async fn add_fs(&self, fs: &FsConfig) -> Result<Option<PciDeviceInfo>> {
        self.add("vm.add-fs", fs).await
    }

    pub async fn add_disk(&self, disk: &DiskConfig) -> Result<Option<PciDeviceInfo>> {
        self.add("vm.add-disk", disk).await
    }

    async fn add<B: Serialize>(
        &self,
        endpoint: &'static str,
        body: &B,
    ) -> Result<Option<PciDeviceInfo>> {
        let reply = self.put(endpoint, Some(body)).await?;
        if reply.is_empty() {
            return Ok(None);
        }
        decode(endpoint, &reply).map(Some)
    }

    async fn get<R: DeserializeOwned>(&self, endpoint: &'static str) -> Result<R> {
        let reply = self.call(Method::GET, endpoint, None).await?;
        decode(endpoint, &reply)
    }

    async fn put_empty(&self, endpoint: &'static str) -> Result<()> {
        self.put::<()>(endpoint, None).await.map(drop)
    }

    async fn put<B: Serialize>(&self, endpoint: &'static str, body: Option<&B>) -> Result<Bytes> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| transport(endpoint, format!("encode the request: {e}")))?;
        self.call(Method::PUT, endpoint, body).await
    }

    async fn call(
        &self,
        method: Method,
        endpoint: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes> {
        let req = request(method, endpoint, body)?;
        let (status, reply) = tokio::time::timeout(self.limit, self.send(endpoint, req))
            .await
            .map_err(|_| Error::Timeout {
                call: format!("cloud-hypervisor API {endpoint}"),
                after: self.limit,
            })??;
        if status.is_success() {
            Ok(reply)
        } else {
            Err(api_error(endpoint, status, &reply))
        }
    }

    async fn send(
        &self,
        endpoint: &'static str,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes)> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            transport(
                endpoint,
                format!("connect to {}: {e}", self.socket.display()),
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(endpoint, e.to_string()))?;
        // The connection future does the I/O; it ends when the sender is dropped.
        let io = tokio::spawn(conn);
        let result = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        }
        .await
        .map_err(|e| transport(endpoint, e.to_string()));
        drop(sender);
        io.abort();
        result
    }
}

/// The request line CH's server wants: the path alone, `Host` set, JSON bodies.
fn request(
    method: Method,
    endpoint: &'static str,
    body: Option<Vec<u8>>,
) -> Result<Request<Full<Bytes>>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("/api/v1/{endpoint}"))
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::ACCEPT, "application/json");
    if body.is_some() {
        b = b.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    b.body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| transport(endpoint, format!("build the request: {e}")))
}

fn decode<R: DeserializeOwned>(endpoint: &'static str, body: &[u8]) -> Result<R> {
    serde_json::from_slice(body).map_err(|e| {
        transport(
            endpoint,
            format!(
                "unexpected reply ({e}): {}",
                String::from_utf8_lossy(body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        )
    })
}

fn transport(endpoint: &'static str, message: String) -> Error {
    Error::ChTransport { endpoint, message }
}

/// CH answers errors with a JSON list of its error chain (v40+), older versions with a JSON
/// string; anything else is passed on as text.
fn api_error(endpoint: &'static str, status: StatusCode, body: &[u8]) -> Error {
    let message = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(chain)) => chain
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(": "),
        Ok(serde_json::Value::String(s)) => s,
        _ => String::from_utf8_lossy(body).trim().to_owned(),
    };
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_owned()
    } else {
        message
    };
    Error::ChApi {
        endpoint,
        status: status.as_u16(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn requests_carry_the_path_host_and_json_type() {
        let r = request(Method::PUT, "vm.create", Some(b"{}".to_vec())).unwrap();
        assert_eq!(r.uri(), "/api/v1/vm.create");
        assert_eq!(r.method(), Method::PUT);
        assert_eq!(r.headers()["host"], "localhost");
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = request(Method::GET, "vm.info", None).unwrap();
        assert!(r.headers().get("content-type").is_none());
    }

    #[test]
    fn api_errors_name_the_endpoint_and_ch_text() {
        let chain = br#"["Error creating the VM","Invalid payload: kernel not found"]"#;
        let e = api_error("vm.create", StatusCode::INTERNAL_SERVER_ERROR, chain).to_string();
        assert!(
            e.contains("vm.create")
                && e.contains("500")
                && e.contains("Error creating the VM: Invalid payload: kernel not found"),
            "{e}"
        );
        let e = api_error("vm.boot", StatusCode::NOT_FOUND, br#""VM is not created""#);
        assert!(
            matches!(&e, Error::ChApi { status: 404, message, .. } if message == "VM is not created"),
            "{e}"
        );
        let e = api_error("vm.pause", StatusCode::METHOD_NOT_ALLOWED, b"").to_string();
        assert!(
            e.contains("vm.pause") && e.contains("Method Not Allowed"),
            "{e}"
        );
        let e = api_error("vm.resize", StatusCode::TOO_MANY_REQUESTS, b"busy\n").to_string();
        assert!(e.contains("429") && e.ends_with("busy"), "{e}");
    }

    /// What the fake server saw: method, path, body.
    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

    /// A stand-in for CH's API server, answering each path with a fixed status and body.
    async fn fake_server(dir: &Path, routes: Vec<(&'static str, u16, &'static str)>) -> Seen {
        use hyper::service::service_fn;
        let sock = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let seen: Seen = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (routes, log) = (routes.clone(), log.clone());
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (routes, log) = (routes.clone(), log.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let path = parts.uri.path().to_owned();
                        log.lock().unwrap().push((
                            parts.method.to_string(),
                            path.clone(),
                            String::from_utf8_lossy(&body).into_owned(),
                        ));
                        let (_, code, text) = routes
                            .iter()
                            .find(|(p, ..)| *p == path)
                            .copied()
                            .unwrap_or(("", 404, ""));
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(code)
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        seen
    }

    #[tokio::test]
    async fn calls_round_trip_through_http() {
        let dir = tempfile::tempdir().unwrap();
        let seen = fake_server(
            dir.path(),
            vec![
                ("/api/v1/vmm.ping", 200, r#"{"version":"v54.0.0","pid":7}"#),
                ("/api/v1/vm.create", 204, ""),
                (
                    "/api/v1/vm.add-disk",
                    200,
                    r#"{"id":"_disk0","bdf":"0000:00:06.0"}"#,
                ),
                ("/api/v1/vm.add-fs", 204, ""),
                (
                    "/api/v1/vm.boot",
                    500,
                    r#"["Error booting VM","Cannot open /dev/kvm"]"#,
                ),
            ],
        )
        .await;
        let c = ApiClient::new(&dir.path().join("api.sock"), Duration::from_secs(10));
        let ping = c.ping().await.unwrap();
        assert_eq!((ping.version.as_str(), ping.pid), ("v54.0.0", Some(7)));
        c.create(&VmConfig::default()).await.unwrap();
        let disk = DiskConfig {
            path: "/d.img".into(),
            ..DiskConfig::default()
        };
        let added = c.add_disk(&disk).await.unwrap().unwrap();
        assert_eq!(added.bdf, "0000:00:06.0");
        assert_eq!(
            c.add_fs(&FsConfig::new("t", "/s".into())).await.unwrap(),
            None
        );
        let e = c.boot().await.unwrap_err().to_string();
        assert!(
            e.contains("vm.boot") && e.contains("Cannot open /dev/kvm"),
            "{e}"
        );
        let e = c.info().await.unwrap_err().to_string();
        assert!(e.contains("vm.info") && e.contains("404"), "{e}");

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].0, "GET");
        assert_eq!(
            (seen[1].0.as_str(), seen[1].1.as_str()),
            ("PUT", "/api/v1/vm.create")
        );
        let sent: serde_json::Value = serde_json::from_str(&seen[2].2).unwrap();
        assert_eq!(sent["path"], "/d.img");
        assert_eq!(seen[4].2, "", "vm.boot has no body");
    }

    /// Every call the client can make goes to an endpoint CH publishes, with its method and a
    /// body of the schema it names.
    #[tokio::test]
    async fn every_call_matches_the_published_endpoints() {
        use crate::cloud_hypervisor::api::VmState;
        use crate::cloud_hypervisor::tests::conforms;
        let dir = tempfile::tempdir().unwrap();
        let seen = fake_server(
            dir.path(),
            vec![
                ("/api/v1/vmm.ping", 200, r#"{"version":"54.0.0"}"#),
                ("/api/v1/vm.info", 200, include_str!("vm-info-v54.json")),
                ("/api/v1/vm.create", 204, ""),
                ("/api/v1/vm.boot", 204, ""),
                ("/api/v1/vm.pause", 204, ""),
                ("/api/v1/vm.resume", 204, ""),
                ("/api/v1/vm.resize", 204, ""),
                ("/api/v1/vm.add-net", 204, ""),
                ("/api/v1/vm.add-fs", 204, ""),
                ("/api/v1/vm.add-disk", 204, ""),
                ("/api/v1/vm.shutdown", 204, ""),
                ("/api/v1/vmm.shutdown", 204, ""),
            ],
        )
        .await;
        let c = ApiClient::new(&dir.path().join("api.sock"), Duration::from_secs(10));
        c.ping().await.unwrap();
        c.create(&VmConfig::default()).await.unwrap();
        c.boot().await.unwrap();
        assert_eq!(c.info().await.unwrap().state, VmState::Created);
        c.pause().await.unwrap();
        c.resume().await.unwrap();
        let resize = VmResize {
            desired_vcpus: Some(2),
            ..VmResize::default()
        };
        c.resize(&resize).await.unwrap();
        c.add_net(&NetConfig::default()).await.unwrap();
        c.add_fs(&FsConfig::new("t", "/s".into())).await.unwrap();
        c.add_disk(&DiskConfig::default()).await.unwrap();
        c.shutdown().await.unwrap();
        c.vmm_shutdown().await.unwrap();

        let api: serde_json::Value = serde_json::from_str(include_str!("ch-api-v54.json")).unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 12);
        for (method, path, body) in seen {
            let ep = path.strip_prefix("/api/v1").unwrap();
            let spec = &api["endpoints"][ep];
            assert_eq!(spec["method"], method.as_str(), "{ep}");
            match spec["body"].as_str() {
                Some(schema) => conforms(schema, &serde_json::from_str(&body).unwrap())
                    .unwrap_or_else(|e| panic!("{ep}: {e}")),
                None => assert_eq!(body, "", "{ep} takes no body"),
            }
        }
    }

    #[tokio::test]
    async fn a_missing_socket_says_which_call_and_where() {
        let dir = tempfile::tempdir().unwrap();
        let c = ApiClient::new(&dir.path().join("gone.sock"), Duration::from_secs(10));
        let e = c.ping().await.unwrap_err().to_string();
        assert!(e.contains("vmm.ping") && e.contains("gone.sock"), "{e}");
    }
}
