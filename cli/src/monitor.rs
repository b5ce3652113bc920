//! `cocoon monitor --listen ADDR`: one Prometheus endpoint (`GET /metrics`, text format) for
//! every pod on the host, in the way of `kata-monitor`. Each scrape asks every shim's
//! `GET /stats` at once, each bounded by the per-pod timeout, and writes one family per
//! metric with the pods as label sets (`sandbox_id`, `namespace`): a slow or dead pod costs
//! the scrape at most the bound and shows as `cocoon_pod_up 0`, its guest part as
//! `cocoon_guest_up 0`. The text is `prometheus-client`'s (the Prometheus project's Rust
//! client), not written by hand.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::client;
use crate::ps::endpoints;

type Labels = Vec<(String, String)>;
type GaugeF = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterF = Family<Labels, Counter<f64, AtomicU64>>;

/// A shim's `GET /stats` (`shim/src/admin`), the parts the monitor shows.
#[derive(Debug, Deserialize)]
struct Stats {
    namespace: String,
    sandbox_id: String,
    vm: Option<Vm>,
    containers: Vec<String>,
    oom_events: u64,
    host: Option<Host>,
    guest: Option<Guest>,
    agent_calls: Vec<Calls>,
}

#[derive(Debug, Deserialize)]
struct Vm {
    hypervisor: String,
    vcpus: u32,
    memory_mib: u32,
    from_template: bool,
    started_unix_ms: u64,
    vmm_started_ms: Option<u64>,
    agent_ready_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Host {
    cpu_seconds: f64,
    pss_bytes: u64,
}

#[derive(Debug, Deserialize)]
struct Guest {
    mem_total_bytes: u64,
    mem_available_bytes: u64,
    cpu_busy_seconds: f64,
    cpu_idle_seconds: f64,
}

#[derive(Debug, Clone, Deserialize)]
struct Calls {
    call: String,
    count: u64,
    errors: u64,
    sum_seconds: f64,
    buckets: Vec<(f64, u64)>,
}

/// Serves `/metrics` on `listen` until killed; prints the bound address first.
pub async fn serve(
    state_dir: PathBuf,
    template_dir: PathBuf,
    listen: &str,
    per_pod: Duration,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let (state_dir, template_dir) = (state_dir.clone(), template_dir.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (state_dir, template_dir) = (state_dir.clone(), template_dir.clone());
                async move {
                    Ok::<_, Infallible>(match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => {
                            let text = scrape(&state_dir, &template_dir, per_pod).await;
                            let mut r = Response::new(Full::new(Bytes::from(text)));
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "text/plain; version=0.0.4; charset=utf-8",
                                ),
                            );
                            r
                        }
                        _ => {
                            let mut r = Response::new(Full::new(Bytes::from_static(
                                b"cocoon monitor serves GET /metrics\n",
                            )));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One scrape: every pod's stats, at once, as Prometheus text.
pub async fn scrape(state_dir: &Path, template_dir: &Path, per_pod: Duration) -> String {
    let t0 = Instant::now();
    // The guest gets most of the pod's bound, so that the shim still answers in time with
    // the host's part when the guest does not.
    let path = format!("/stats?guest_ms={}", per_pod.as_millis() * 3 / 4);
    let asks = endpoints(state_dir).into_iter().map(|(id, socket)| {
        let path = path.clone();
        async move {
            let got = client::get(&socket, &path, per_pod).await.and_then(|b| {
                serde_json::from_slice::<Stats>(&b).map_err(|e| anyhow::anyhow!("{e}"))
            });
            (id, got)
        }
    });
    let pods = futures_util::future::join_all(asks).await;
    encode(&pods, template_dir, t0.elapsed())
}

/// The metrics of one scrape.
#[derive(Default)]
struct Families {
    up: GaugeF,
    info: GaugeF,
    containers: GaugeF,
    vcpus: GaugeF,
    memory: GaugeF,
    started: GaugeF,
    boot: GaugeF,
    host_cpu: CounterF,
    host_pss: GaugeF,
    guest_up: GaugeF,
    guest_total: GaugeF,
    guest_available: GaugeF,
    guest_cpu: CounterF,
    call_errors: CounterF,
    ooms: CounterF,
    pods: Gauge<f64, AtomicU64>,
    templates: GaugeF,
    scrape: Gauge<f64, AtomicU64>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn encode(pods: &[(String, anyhow::Result<Stats>)], template_dir: &Path, took: Duration) -> String {
    let f = Families::default();
    let mut histograms = Vec::new();
    for (id, got) in pods {
        let Ok(s) = got else {
            f.up.get_or_create(&labels(&[("sandbox_id", id), ("namespace", "")]))
                .set(0.0);
            continue;
        };
        let pod = labels(&[("sandbox_id", &s.sandbox_id), ("namespace", &s.namespace)]);
        let with = |k: &str, v: &str| {
            let mut l = pod.clone();
            l.push((k.to_owned(), v.to_owned()));
            l
        };
        f.up.get_or_create(&pod).set(1.0);
        f.containers
            .get_or_create(&pod)
            .set(s.containers.len() as f64);
        f.ooms.get_or_create(&pod).inc_by(s.oom_events as f64);
        if let Some(vm) = &s.vm {
            let start = if vm.from_template {
                "template"
            } else {
                "kernel boot"
            };
            let mut info = with("hypervisor", &vm.hypervisor);
            info.push(("start".into(), start.into()));
            f.info.get_or_create(&info).set(1.0);
            f.vcpus.get_or_create(&pod).set(f64::from(vm.vcpus));
            f.memory
                .get_or_create(&pod)
                .set(f64::from(vm.memory_mib) * 1024.0 * 1024.0);
            f.started
                .get_or_create(&pod)
                .set(vm.started_unix_ms as f64 / 1000.0);
            for (phase, ms) in [
                ("vmm_started", vm.vmm_started_ms),
                ("agent_ready", vm.agent_ready_ms),
            ] {
                if let Some(ms) = ms {
                    f.boot
                        .get_or_create(&with("phase", phase))
                        .set(ms as f64 / 1000.0);
                }
            }
        }
        if let Some(h) = &s.host {
            f.host_cpu.get_or_create(&pod).inc_by(h.cpu_seconds);
            f.host_pss.get_or_create(&pod).set(h.pss_bytes as f64);
        }
        f.guest_up
            .get_or_create(&pod)
            .set(if s.guest.is_some() { 1.0 } else { 0.0 });
        if let Some(g) = &s.guest {
            f.guest_total
                .get_or_create(&pod)
                .set(g.mem_total_bytes as f64);
            f.guest_available
                .get_or_create(&pod)
                .set(g.mem_available_bytes as f64);
            f.guest_cpu
                .get_or_create(&with("mode", "busy"))
                .inc_by(g.cpu_busy_seconds);
            f.guest_cpu
                .get_or_create(&with("mode", "idle"))
                .inc_by(g.cpu_idle_seconds);
        }
        for c in &s.agent_calls {
            f.call_errors
                .get_or_create(&with("call", &c.call))
                .inc_by(c.errors as f64);
            histograms.push((with("call", &c.call), c.clone()));
        }
    }
    f.pods.set(pods.len() as f64);
    for (state, n) in templates(template_dir) {
        f.templates
            .get_or_create(&labels(&[("state", state)]))
            .set(n as f64);
    }
    f.scrape.set(took.as_secs_f64());

    let mut r = Registry::default();
    let g =
        |r: &mut Registry, name: &str, help: &str, m: &GaugeF| r.register(name, help, m.clone());
    g(
        &mut r,
        "cocoon_pod_up",
        "1 if the pod's shim answered within the per-pod timeout",
        &f.up,
    );
    g(
        &mut r,
        "cocoon_pod_info",
        "The pod VM's hypervisor and start path (template or kernel boot)",
        &f.info,
    );
    g(
        &mut r,
        "cocoon_pod_containers",
        "Containers in the pod",
        &f.containers,
    );
    g(
        &mut r,
        "cocoon_pod_vcpus",
        "vCPUs of the pod's VM",
        &f.vcpus,
    );
    g(
        &mut r,
        "cocoon_pod_memory_bytes",
        "Guest memory the pod's VM was given",
        &f.memory,
    );
    g(
        &mut r,
        "cocoon_pod_start_time_seconds",
        "When the pod's VM started, Unix time",
        &f.started,
    );
    g(
        &mut r,
        "cocoon_pod_boot_phase_seconds",
        "Host time from the boot's start to each phase: VMM up, agent answering",
        &f.boot,
    );
    r.register(
        "cocoon_pod_host_cpu_seconds",
        "CPU time (user + system) of the pod's VMM and helpers",
        f.host_cpu.clone(),
    );
    g(
        &mut r,
        "cocoon_pod_host_pss_bytes",
        "Proportional set size of the pod's VMM and helpers",
        &f.host_pss,
    );
    g(
        &mut r,
        "cocoon_guest_up",
        "1 if the guest's agent answered within the scrape's bound",
        &f.guest_up,
    );
    g(
        &mut r,
        "cocoon_guest_memory_total_bytes",
        "The guest kernel's MemTotal",
        &f.guest_total,
    );
    g(
        &mut r,
        "cocoon_guest_memory_available_bytes",
        "The guest kernel's MemAvailable",
        &f.guest_available,
    );
    r.register(
        "cocoon_guest_cpu_seconds",
        "vCPU time since the guest booted, busy or idle",
        f.guest_cpu.clone(),
    );
    r.register(
        "cocoon_agent_call_errors",
        "Agent calls that failed or timed out, by call",
        f.call_errors.clone(),
    );
    r.register(
        "cocoon_pod_oom_events",
        "OOM kills in the pod's containers",
        f.ooms.clone(),
    );
    r.register(
        "cocoon_pods",
        "Pods on the host with a shim",
        f.pods.clone(),
    );
    g(
        &mut r,
        "cocoon_templates",
        "VM templates on the host by state: ready, incomplete, failed",
        &f.templates,
    );
    r.register(
        "cocoon_scrape_duration_seconds",
        "How long this scrape took",
        f.scrape.clone(),
    );
    r.register_collector(Box::new(CallHistograms(histograms)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        return format!("# encoding failed: {e}\n");
    }
    out
}

/// The agent calls' latency: histograms the shims counted, written as they are.
#[derive(Debug)]
struct CallHistograms(Vec<(Labels, Calls)>);

impl Collector for CallHistograms {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "cocoon_agent_call_duration_seconds",
            "Agent calls by the shim, queued to answered, by call",
            None,
            MetricType::Histogram,
        )?;
        for (labels, c) in &self.0 {
            metric.encode_family(labels)?.encode_histogram::<Labels>(
                c.sum_seconds,
                c.count,
                &per_bucket(c),
                None,
            )?;
        }
        Ok(())
    }
}

/// VM templates in `dir` by state: `ready` (meta.json, written last), `failed` (failed.json),
/// `incomplete` (neither: being made, or cut short).
fn templates(dir: &Path) -> Vec<(&'static str, u64)> {
    let (mut ready, mut failed, mut incomplete) = (0, 0, 0);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if p.join("meta.json").exists() {
            ready += 1;
        } else if p.join("failed.json").exists() {
            failed += 1;
        } else {
            incomplete += 1;
        }
    }
    vec![
        ("ready", ready),
        ("failed", failed),
        ("incomplete", incomplete),
    ]
}

/// The shim's cumulative buckets as the encoder takes them: each bucket's own count, and the
/// calls past the last bound in `+Inf` (`f64::MAX`).
fn per_bucket(c: &Calls) -> Vec<(f64, u64)> {
    let mut below = 0;
    let mut out: Vec<(f64, u64)> = c
        .buckets
        .iter()
        .map(|(bound, cumulative)| {
            let own = cumulative.saturating_sub(below);
            below = *cumulative;
            (*bound, own)
        })
        .collect();
    out.push((f64::MAX, c.count.saturating_sub(below)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(json: serde_json::Value) -> anyhow::Result<Stats> {
        Ok(serde_json::from_value(json).unwrap())
    }

    /// A shim's answer becomes series that a Prometheus parser reads back; a pod that did
    /// not answer is `cocoon_pod_up 0`.
    #[test]
    fn stats_become_prometheus_text() {
        let pod = stats(serde_json::json!({
            "namespace": "k8s.io", "shim_pid": 7, "sandbox_id": "p1",
            "vm": {"hypervisor": "qemu", "vcpus": 1, "memory_mib": 256, "from_template": true,
                   "ram_cloned": true, "started_unix_ms": 1000, "vmm_pid": 9, "pids": [["qemu", 9]],
                   "vmm_started_ms": 120, "agent_ready_ms": 450},
            "containers": ["a", "b"], "oom_events": 1,
            "host": {"cpu_seconds": 2.5, "pss_bytes": 1048576},
            "guest": {"mem_total_bytes": 200, "mem_available_bytes": 100,
                      "cpu_busy_seconds": 1.0, "cpu_idle_seconds": 3.0},
            "guest_error": null,
            "agent_calls": [{"call": "Check", "count": 3, "errors": 1, "sum_seconds": 0.5,
                             "buckets": [[0.01, 1], [0.1, 2]]}]
        }));
        let pods = vec![
            ("p1".to_owned(), pod),
            ("p2".to_owned(), Err(anyhow::anyhow!("no answer"))),
        ];
        let text = encode(&pods, Path::new("/nonexistent"), Duration::from_millis(5));
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str, sandbox: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get("sandbox_id") == Some(sandbox))
                .map(|s| s.value.clone())
        };
        use prometheus_parse::Value as V;
        assert_eq!(value("cocoon_pod_up", "p1"), Some(V::Gauge(1.0)), "{text}");
        assert_eq!(value("cocoon_pod_up", "p2"), Some(V::Gauge(0.0)), "{text}");
        assert_eq!(value("cocoon_pod_containers", "p1"), Some(V::Gauge(2.0)));
        // The parser types `_total` samples by their own name (untyped): the value is what counts.
        let number = |v: Option<V>| match v {
            Some(V::Counter(x) | V::Gauge(x) | V::Untyped(x)) => Some(x),
            _ => None,
        };
        assert_eq!(
            number(value("cocoon_pod_host_cpu_seconds_total", "p1")),
            Some(2.5)
        );
        assert_eq!(
            number(value("cocoon_pod_oom_events_total", "p1")),
            Some(1.0)
        );
        let Some(V::Histogram(h)) = value("cocoon_agent_call_duration_seconds", "p1") else {
            panic!("no histogram: {text}");
        };
        let counts: Vec<f64> = h.iter().map(|b| b.count).collect();
        assert_eq!(counts, [1.0, 2.0, 3.0], "{text}");
        assert!(text.contains("cocoon_pods 2"), "{text}");
    }

    /// The dashboard in docs/ asks only for series the monitor writes.
    #[test]
    fn the_grafana_dashboard_uses_metrics_that_exist() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana-cocoon.json")).unwrap();
        let pod = stats(serde_json::json!({
            "namespace": "n", "sandbox_id": "p", "containers": [], "oom_events": 0,
            "vm": {"hypervisor": "qemu", "vcpus": 1, "memory_mib": 256, "from_template": false,
                   "started_unix_ms": 1, "vmm_started_ms": 1, "agent_ready_ms": 2},
            "host": {"cpu_seconds": 1.0, "pss_bytes": 1},
            "guest": {"mem_total_bytes": 2, "mem_available_bytes": 1,
                      "cpu_busy_seconds": 1.0, "cpu_idle_seconds": 1.0},
            "agent_calls": [{"call": "Check", "count": 1, "errors": 0, "sum_seconds": 0.1,
                             "buckets": [[0.5, 1]]}]
        }));
        let text = encode(
            &[("p".to_owned(), pod)],
            Path::new("/nonexistent"),
            Duration::ZERO,
        );
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                exprs.push(t["expr"].as_str().unwrap().to_owned());
            }
        }
        assert!(exprs.len() >= 10);
        for expr in exprs {
            let mut rest = expr.as_str();
            while let Some(i) = rest.find("cocoon_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    text.lines().any(|l| l.starts_with(&name)),
                    "{name} (in {expr}) is not written:\n{text}"
                );
                rest = &rest[i + name.len()..];
            }
        }
    }
}
