//! The node's label `cocoon.io/runtime=true`, which the RuntimeClass `cocoon` selects nodes
//! by: set once Cocoon is installed (and containerd restarted), taken off at uninstall. One
//! merge patch on the node through the API server, with the pod's service account (RBAC in
//! deploy/rbac.yaml: get and patch nodes). ureq (with rustls) rather than a Kubernetes client
//! crate: this is the one call the installer makes.

use std::time::Duration;

use crate::{Error, Result};

/// The label, as the RuntimeClass's `scheduling.nodeSelector` has it.
pub const LABEL: &str = "cocoon.io/runtime";

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the API server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `https://host:port` (`http://` only in tests).
    pub base: String,
    pub token: String,
    /// The cluster's CA, PEM; None trusts the usual web roots (tests over plain HTTP).
    pub ca_pem: Option<Vec<u8>>,
}

impl Cluster {
    /// The cluster this pod runs in, from its environment and service account.
    pub fn in_cluster() -> Result<Cluster> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| Error::Node("not in a cluster (no KUBERNETES_SERVICE_HOST)".into()))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let read = |name: &str| {
            std::fs::read(format!("{SERVICE_ACCOUNT}/{name}"))
                .map_err(|e| Error::Node(format!("the service account's {name}: {e}")))
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Cluster {
            base: format!("https://{host}:{port}"),
            token: String::from_utf8_lossy(&read("token")?).trim().to_owned(),
            ca_pem: Some(read("ca.crt")?),
        })
    }
}

/// The merge patch that sets the label (`true`) or takes it off (`null`).
pub fn patch_body(set: bool) -> String {
    let value = if set { "\"true\"" } else { "null" };
    format!("{{\"metadata\":{{\"labels\":{{\"{LABEL}\":{value}}}}}}}")
}

/// Sets or removes the label on `node`.
pub fn label(cluster: &Cluster, node: &str, set: bool) -> Result<()> {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false);
    if let Some(pem) = &cluster.ca_pem {
        let certs: Vec<_> = ureq::tls::parse_pem(pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(Error::Node("the cluster's CA holds no certificate".into()));
        }
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                .build(),
        );
    }
    let agent: ureq::Agent = config.build().into();
    let url = format!("{}/api/v1/nodes/{node}", cluster.base);
    let mut resp = agent
        .patch(&url)
        .header("Authorization", &format!("Bearer {}", cluster.token))
        .header("Content-Type", "application/merge-patch+json")
        .header("Accept", "application/json")
        .send(patch_body(set))
        .map_err(|e| Error::Node(format!("PATCH {url}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        return Err(Error::Node(format!(
            "PATCH {url}: {status}: {}",
            text.trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    /// One request to a fake API server: its head and body; it answers `status`.
    fn serve_once(status: &'static str) -> (String, std::thread::JoinHandle<(String, String)>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            )
            .unwrap();
            (head, String::from_utf8(body).unwrap())
        });
        (base, t)
    }

    #[test]
    fn the_label_is_one_merge_patch_with_the_token() {
        let (base, server) = serve_once("200 OK");
        let cluster = Cluster {
            base,
            token: "tok".into(),
            ca_pem: None,
        };
        label(&cluster, "node-1", true).unwrap();
        let (head, body) = server.join().unwrap();
        assert!(
            head.starts_with("PATCH /api/v1/nodes/node-1 HTTP/1.1"),
            "{head}"
        );
        assert!(
            head.contains("authorization: Bearer tok")
                || head.contains("Authorization: Bearer tok"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/merge-patch+json"),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["metadata"]["labels"][LABEL], "true");
        let off: serde_json::Value = serde_json::from_str(&patch_body(false)).unwrap();
        assert!(off["metadata"]["labels"][LABEL].is_null());
    }

    #[test]
    fn a_refusal_is_an_error_with_the_answer() {
        let (base, server) = serve_once("403 Forbidden");
        let cluster = Cluster {
            base,
            token: "tok".into(),
            ca_pem: None,
        };
        let e = label(&cluster, "node-1", true).unwrap_err().to_string();
        server.join().unwrap();
        assert!(e.contains("403"), "{e}");
    }
}
