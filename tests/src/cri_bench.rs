//! `make bench`'s CRI figures: a pod through containerd's CRI plugin with the handlers
//! `cocoon`, `runc` and `gvisor` (runc's shim running `runsc`) side by side, one run, one
//! machine: pod start (RunPodSandbox to the first HTTP reply from the pod IP) and the round
//! trip of a small HTTP request, and host → pod TCP throughput (32 MiB into `nc -l` in the pod,
//! timed from connect to the server's close after it read everything); and a second container
//! that binds a host directory, created and started in the running pod (in a Cocoon pod, which
//! started without virtio-fs, that is when the share is plugged in).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cri::{ContainerSpec, Cri, HANDLER};

/// The handlers compared, with the name the results use.
pub const HANDLERS: [(&str, &str); 3] =
    [("cocoon", HANDLER), ("runc", "runc"), ("gvisor", "gvisor")];

const SERVER: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www",
];

/// A sink in the pod: netcat 1.10 semantics (Debian's busybox), so it reads the connection to
/// its end and closes it then, whatever its own stdin does.
const SINK: &[&str] = &["sh", "-c", "while true; do nc -l -p 9000 > /dev/null; done"];
/// Bytes per throughput sample.
const TRANSFER: usize = 32 << 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One HTTP GET of `/`; the whole reply.
fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Sends [`TRANSFER`] bytes to the sink, half-closes, and waits for the sink's close: MB/s.
fn transfer(addr: SocketAddr) -> std::io::Result<f64> {
    let t0 = Instant::now();
    let mut s = loop {
        // The sink's loop restarts nc after each connection.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let t0 = Instant::now();
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let buf = vec![0x5au8; 256 << 10];
    let mut sent = 0;
    while sent < TRANSFER {
        s.write_all(&buf)?;
        sent += buf.len();
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = vec![];
    s.read_to_end(&mut rest)?;
    Ok(TRANSFER as f64 / 1e6 / t0.elapsed().as_secs_f64())
}

/// Runs a pod with the server; returns its id, address and the time to its first reply.
async fn start_pod(
    cri: &mut Cri,
    name: &str,
    handler: &str,
) -> Result<(String, String, Duration), String> {
    let t0 = Instant::now();
    let (pod, config) = cri.try_run_pod(name, handler).await?;
    cri.try_start_container(
        &pod,
        &config,
        ContainerSpec {
            name: "server",
            command: SERVER,
        },
    )
    .await?;
    let ip = cri.pod_ip(&pod).await;
    let addr: SocketAddr = format!("{ip}:8080")
        .parse()
        .map_err(|e| format!("pod IP {ip:?}: {e}"))?;
    while !get(addr).is_ok_and(|b| b.contains("ok")) {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("no HTTP reply from {addr} within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((pod, ip, t0.elapsed()))
}

fn summary(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.is_empty() { 0.0 } else { s[s.len() / 2] };
    json!({"median": median, "min": s.first(), "max": s.last(), "n": s.len()})
}

/// The CRI figures for every handler; a handler that fails here gives its error instead.
pub async fn figures(runs: usize) -> Value {
    let mut cri = Cri::start().await;
    let mut out = serde_json::Map::new();
    for (name, handler) in HANDLERS {
        let r = one_handler(&mut cri, handler, runs).await;
        println!("CRI {name}: {r}");
        out.insert(name.to_owned(), r);
    }
    Value::Object(out)
}

async fn one_handler(cri: &mut Cri, handler: &str, runs: usize) -> Value {
    let mut start = vec![];
    let mut rtt = vec![];
    let mut tcp = vec![];
    let mut joined = vec![];
    let volume = tempfile::tempdir().map_err(|e| e.to_string());
    for i in 0..runs {
        let (pod, ip, t) = match start_pod(cri, &format!("bench-{handler}-{i}"), handler).await {
            Ok(v) => v,
            Err(e) => return json!({"error": e}),
        };
        start.push(ms(t));
        let config = cri.pod_config(&format!("bench-{handler}-{i}"));
        let mount = k8s_cri::v1::Mount {
            container_path: "/data".into(),
            host_path: match &volume {
                Ok(d) => d.path().to_string_lossy().into_owned(),
                Err(e) => return json!({"error": format!("a temp dir: {e}")}),
            },
            ..Default::default()
        };
        let with_dir = ContainerSpec {
            name: "with-dir",
            command: &["sleep", "1000"],
        };
        let t0 = Instant::now();
        match cri
            .try_start_container_with(&pod, &config, with_dir, vec![mount], None)
            .await
        {
            Ok(_) => joined.push(ms(t0.elapsed())),
            Err(e) => return json!({"error": e}),
        }
        if i == 0 {
            let addr: SocketAddr = format!("{ip}:8080")
                .parse()
                .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
            for _ in 0..50 {
                let t0 = Instant::now();
                if get(addr).is_ok() {
                    rtt.push(ms(t0.elapsed()));
                }
            }
            let sink = ContainerSpec {
                name: "sink",
                command: SINK,
            };
            if let Err(e) = cri.try_start_container(&pod, &config, sink).await {
                return json!({"error": e});
            }
            let addr = SocketAddr::new(addr.ip(), 9000);
            for _ in 0..3 {
                match tokio::task::spawn_blocking(move || transfer(addr)).await {
                    Ok(Ok(mbps)) => tcp.push(mbps),
                    Ok(Err(e)) => return json!({"error": format!("TCP to {addr}: {e}")}),
                    Err(e) => return json!({"error": e.to_string()}),
                }
            }
        }
        cri.stop_and_remove_pod(&pod).await;
    }
    json!({
        "pod_start_ms": summary(&start),
        "http_rtt_ms": summary(&rtt),
        "tcp_host_to_pod_mbps": summary(&tcp),
        "host_dir_container_ms": summary(&joined),
    })
}

/// The CRI rows of results.md.
pub fn markdown(cri: &Value) -> String {
    let f = |v: &Value| format!("{:.1}", v.as_f64().unwrap_or(f64::NAN));
    let mut s = String::from(
        "\n| CRI pod | pod start, RunPodSandbox → first HTTP reply (ms, median) | HTTP round trip (ms, median) | TCP host → pod (MB/s, median of 3 × 32 MiB) | a container with a host directory joins (create + start, ms, median) |\n|---|---|---|---|---|\n",
    );
    for (name, _) in HANDLERS {
        let v = &cri[name];
        if let Some(e) = v["error"].as_str() {
            s += &format!("| {name} | failed: {e} | | | |\n");
        } else {
            s += &format!(
                "| {name} | {} | {} | {} | {} |\n",
                f(&v["pod_start_ms"]["median"]),
                f(&v["http_rtt_ms"]["median"]),
                f(&v["tcp_host_to_pod_mbps"]["median"]),
                f(&v["host_dir_container_ms"]["median"])
            );
        }
    }
    s
}
