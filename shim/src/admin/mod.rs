//! The pod's admin endpoint, for the `cocoon` command (`cli/`): HTTP/1.1 on a unix socket,
//! `<state_dir>/<sandbox>.admin.sock` ([`crate::state::admin_socket`]), root only (0600),
//! served by the shim for as long as it runs; a dead shim's goes with its other leftovers
//! (`state::cleanup`). A thin layer: the answers come from the pod model ([`Pod::facts`]).
//!
//! HTTP rather than another ttrpc service, as Kata's shim-monitor does: an operator can ask
//! with `curl --unix-socket`, and the metrics to come are Prometheus text over HTTP anyway.
//! Beside the pod's run directory rather than in it, because it lives as long as the shim,
//! also before the VM boots and after it stopped, and the run directory is the VM's.
//!
//! - `GET /info`: the pod as JSON ([`Info`]).
//! - `GET /logs[?follow]`: the guest's console ([`logs`]).
//! - `POST /exec` (upgraded): the debug console, when enabled ([`exec`]).
//! - `GET /stats[?guest_ms=N]`: the pod's numbers for `cocoon monitor` ([`PodStats`]); the
//!   guest gets N ms (default 1000) to answer its part.

pub mod exec;
mod logs;

use std::convert::Infallible;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::pod::{Pod, PodFacts, PodStats};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// `GET /info`.
#[derive(Debug, Serialize)]
pub struct Info {
    /// The containerd namespace of the pod.
    pub namespace: String,
    pub shim_pid: u32,
    #[serde(flatten)]
    pub pod: PodFacts,
}

/// `GET /stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub namespace: String,
    pub shim_pid: u32,
    #[serde(flatten)]
    pub pod: PodStats,
}

/// How long the guest gets to answer a `/stats` by default.
const GUEST_MS: u64 = 1000;

/// The value of `key` in a query string (`a=1&b`), if it is there.
fn query<'q>(q: Option<&'q str>, key: &str) -> Option<&'q str> {
    q?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == key => Some(v),
        None if kv == key => Some(""),
        _ => None,
    })
}

/// A serving endpoint; dropping it stops serving and removes the socket.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Serves `pod` on `path`. The socket is bound under a temporary name, made root-only,
    /// then renamed into place, so that it is never reachable with looser permissions.
    /// `debug_console`: `[debug] console` of the config, whether `POST /exec` is served.
    pub fn start(
        pod: Pod,
        namespace: String,
        path: PathBuf,
        debug_console: bool,
    ) -> std::io::Result<AdminServer> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)?;
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        log::warn!("admin endpoint: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (pod, namespace) = (pod.clone(), namespace.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (pod, namespace) = (pod.clone(), namespace.clone());
                        async move {
                            Ok::<_, Infallible>(answer(pod, namespace, debug_console, req).await)
                        }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await
                    {
                        log::debug!("admin endpoint: {e}");
                    }
                });
            }
        });
        Ok(AdminServer { path, task })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(
    pod: Pod,
    namespace: String,
    debug_console: bool,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let pod = &pod;
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/exec") => exec::serve(pod.clone(), debug_console, req).await,
        (&Method::GET, "/logs") => {
            let follow = query(req.uri().query(), "follow").is_some_and(|v| v != "0");
            let Some(vm) = pod.facts().await.vm else {
                return reply(
                    StatusCode::CONFLICT,
                    "text/plain",
                    format!(
                        "pod {} has no VM now (not started yet, or stopped)\n",
                        pod.id()
                    )
                    .into_bytes(),
                );
            };
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(logs::stream(logs::Sources::of(&vm.facts), follow, tx));
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/stats") => {
            let guest_ms = query(req.uri().query(), "guest_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(GUEST_MS);
            let stats = Stats {
                namespace,
                shim_pid: std::process::id(),
                pod: pod
                    .pod_stats(std::time::Duration::from_millis(guest_ms))
                    .await,
            };
            json(&stats)
        }
        (&Method::GET, "/info") => {
            let info = Info {
                namespace,
                shim_pid: std::process::id(),
                pod: pod.facts().await,
            };
            json(&info)
        }
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!(
                "no such endpoint: {path} (there are GET /info, /logs, /stats and POST /exec)\n"
            )
            .into_bytes(),
        ),
    }
}

fn json(value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string().into_bytes(),
        ),
    }
}

pub(crate) fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::query;

    #[test]
    fn query_values() {
        assert_eq!(query(Some("follow"), "follow"), Some(""));
        assert_eq!(query(Some("a=1&guest_ms=250"), "guest_ms"), Some("250"));
        assert_eq!(query(Some("a=1"), "guest_ms"), None);
        assert_eq!(query(None, "follow"), None);
    }
}
