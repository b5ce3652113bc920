//! `make bench`'s VM-template figures (issue #16): Cocoon's start from a template and from a
//! kernel boot side by side in one run, with runc for scale: cold `ctr run --rm … true`, the
//! restore's parts (from the driver's and the sandbox's log lines), 10 pods at once, and host
//! PSS per idle pod for both paths. The shim reads its config at each pod's start, so the
//! bench switches `vm.template` by rewriting it between runs.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::containerd::{Containerd, IMAGE, RUNTIME};
use crate::stats::summary;

/// The two ways a Cocoon pod starts, named as the results name them.
pub const PATHS: [(&str, &str); 2] = [("template", "auto"), ("kernel boot", "off")];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Rewrites the shims' config with `vm.template = mode`; returns the original to restore.
pub fn set_template(config: &Path, mode: &str) -> String {
    let original = std::fs::read_to_string(config).unwrap_or_default();
    let base: String = original
        .lines()
        .filter(|l| !l.starts_with("vm."))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(config, format!("{base}[vm]\ntemplate = \"{mode}\"\n"))
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    original
}

fn run(c: &Containerd, runtime: &str, id: &str, detach: bool, cmd: &[&str]) -> bool {
    let mut args = vec![
        "run",
        if detach { "-d" } else { "--rm" },
        "--runtime",
        runtime,
    ];
    args.extend([IMAGE, id]);
    args.extend(cmd);
    let out = c.ctr(&args);
    if !out.status.success() {
        println!("  {id}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    out.status.success()
}

/// Kills and removes container `id`, whatever state it is in.
pub fn remove(c: &Containerd, id: &str) {
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    for _ in 0..100 {
        if c.ctr(&["task", "delete", id]).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.ctr(&["containers", "delete", id]);
}

/// `ctr run --rm … true`, `runs` times; wall ms each.
fn cold(c: &Containerd, runtime: &str, prefix: &str, runs: usize) -> Vec<f64> {
    (0..runs)
        .filter_map(|i| {
            let t = Instant::now();
            run(c, runtime, &format!("{prefix}-{i}"), false, &["true"]).then(|| ms(t.elapsed()))
        })
        .collect()
}

/// `n` pods started at once; when the last was up, and how many made it.
fn at_once(c: &Arc<Containerd>, runtime: &'static str, prefix: &str, n: usize) -> Value {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            let id = format!("{prefix}-{i}");
            std::thread::spawn(move || run(&c, runtime, &id, true, &["sleep", "100000"]))
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .filter(|ok| *ok)
        .count();
    let all = ms(t0.elapsed());
    for i in 0..n {
        remove(c, &format!("{prefix}-{i}"));
    }
    json!({"pods": n, "succeeded": ok, "all_ready_ms": all})
}

fn pss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// KiB of the guest RAM memfds QEMU `pid` maps that no page of its maps: PSS counts mapped
/// pages only, and a restored pod's RAM is copied into its memfd without being mapped
/// (`vmm-driver`'s `template_ram.rs`), so the pages its guest has not touched since are in
/// no process's PSS but are the pod's memory all the same.
fn unmapped_guest_ram_kib(pid: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    // The allocated KiB of the memfd the mapping being read is of.
    let mut memfd: Option<u64> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if !first.ends_with(':') {
            memfd = line
                .contains("/memfd:")
                .then(|| std::fs::metadata(format!("/proc/{pid}/map_files/{first}")).ok())
                .flatten()
                .filter(|m| seen.insert((m.dev(), m.ino())))
                .map(|m| m.blocks() / 2);
        } else if first == "Rss:" {
            if let Some(allocated) = memfd.take() {
                let rss: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total += allocated.saturating_sub(rss);
            }
        }
    }
    total
}

/// Host memory of every Cocoon process of `c` (shim, its guard, qemu, virtiofsd,
/// vhost-device-vsock), by kind: each one's PSS, plus the guest RAM its QEMU's memfds hold
/// unmapped.
pub fn cocoon_pss(c: &Containerd) -> BTreeMap<&'static str, u64> {
    let mut by = BTreeMap::new();
    for p in crate::processes_mentioning(c.dir.path()) {
        let pid = p.split(':').next().unwrap_or("");
        let kind = if p.contains(cocoon_shim::guard::GUARD_ARG) {
            "guard"
        } else if p.contains("containerd-shim-cocoon") {
            "shim"
        } else if p.contains("qemu-system") {
            "qemu"
        } else if p.contains("virtiofsd") {
            "virtiofsd"
        } else if p.contains("vhost-device-vsock") {
            "vhost-device-vsock"
        } else {
            continue;
        };
        *by.entry(kind).or_default() += pss_kib(pid);
        if kind == "qemu" {
            *by.entry("guest RAM not mapped").or_default() += unmapped_guest_ram_kib(pid);
        }
    }
    by
}

/// Host PSS per pod of `n` idle pods (MiB), a few seconds after they started.
fn idle_pss(c: &Containerd, prefix: &str, n: usize) -> Value {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let up = ids
        .iter()
        .filter(|id| run(c, RUNTIME, id, true, &["sleep", "100000"]))
        .count();
    std::thread::sleep(Duration::from_secs(3));
    let by = cocoon_pss(c);
    for id in &ids {
        remove(c, id);
    }
    let total: u64 = by.values().sum();
    let per = |kib: u64| kib as f64 / 1024.0 / up.max(1) as f64;
    json!({
        "pods": up,
        "pss_per_pod_mib": per(total),
        "qemu_pss_per_pod_mib": per(by.get("qemu").copied().unwrap_or(0)),
    })
}

/// A Rust `Duration` as `{:?}` prints it (`228.41ms`, `3.44s`, `950µs`), in ms.
fn debug_ms(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches(',');
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("µs") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 0.000_001)
    } else {
        (s.strip_suffix('s')?, 1000.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// The restore's parts for the pods whose ids start with `prefix`, from the shim's log: the
/// driver's "restored from template (… state loaded N ms, devices in N ms)" and the
/// sandbox's "agent ready after … (BootTimings { vmm_started: …, agent_ready: … })".
pub fn restore_parts(log: &str, prefix: &str) -> Value {
    let mut cols: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let field = |line: &str, key: &str, end: &str| -> Option<f64> {
        let rest = line.split(key).nth(1)?;
        rest.split(end).next()?.trim().parse().ok()
    };
    for line in log.lines() {
        if line.contains(&format!("VM {prefix}")) && line.contains("restored from template") {
            if let Some(v) = field(line, "state loaded ", " ms") {
                cols.entry("1 QEMU start + state loaded")
                    .or_default()
                    .push(v);
            }
            if let Some(v) = field(line, "devices in ", " ms") {
                cols.entry("2 vsock, virtio-fs, NICs plugged")
                    .or_default()
                    .push(v);
            }
        }
        if line.contains(&format!("sandbox {prefix}")) && line.contains("BootTimings") {
            let t = |key: &str| {
                let rest = line.split(key).nth(1)?;
                debug_ms(rest.split([',', ' ', '}']).next()?)
            };
            if let (Some(vmm), Some(ready)) = (t("vmm_started: "), t("agent_ready: ")) {
                cols.entry("0 launch (helpers, restore, devices)")
                    .or_default()
                    .push(vmm);
                cols.entry("3 guest resumed to agent answered (Check + Refresh)")
                    .or_default()
                    .push(ready - vmm);
            }
        }
    }
    crate::stats::summaries(cols)
}

/// Every template figure; leaves `vm.template` as it found it.
pub fn figures(c: &Arc<Containerd>, runs: usize) -> Value {
    let mut out = serde_json::Map::new();
    // The first pod of a shape makes the template (unless one is saved already).
    let original = set_template(&c.cocoon_config, "auto");
    let t = Instant::now();
    run(c, RUNTIME, "tpl-first", false, &["true"]);
    out.insert("first_pod_ms".into(), json!(ms(t.elapsed())));
    let made = c.log().lines().any(|l| l.contains("made VM template"));
    out.insert("first_pod_made_the_template".into(), json!(made));
    std::fs::write(&c.cocoon_config, &original).unwrap_or_default();

    let mut cold_ms = serde_json::Map::new();
    let mut dense = serde_json::Map::new();
    let mut pss = serde_json::Map::new();
    for (name, mode) in PATHS {
        let original = set_template(&c.cocoon_config, mode);
        let tag = if mode == "auto" { "tpl" } else { "kern" };
        println!("cocoon ({name}): cold start, 10 at once, idle PSS…");
        cold_ms.insert(
            format!("cocoon ({name})"),
            summary(&cold(c, RUNTIME, &format!("{tag}-cold"), runs)),
        );
        dense.insert(
            format!("cocoon ({name})"),
            at_once(c, RUNTIME, &format!("{tag}-dense"), 10),
        );
        pss.insert(
            format!("cocoon ({name})"),
            json!([
                idle_pss(c, &format!("{tag}-idle1"), 1),
                idle_pss(c, &format!("{tag}-idle10"), 10)
            ]),
        );
        std::fs::write(&c.cocoon_config, &original).unwrap_or_default();
    }
    println!("runc: cold start, 10 at once…");
    cold_ms.insert(
        "runc".into(),
        summary(&cold(c, "io.containerd.runc.v2", "runc-cold", runs)),
    );
    dense.insert(
        "runc".into(),
        at_once(c, "io.containerd.runc.v2", "runc-dense", 10),
    );
    out.insert("cold_start_ms".into(), cold_ms.into());
    out.insert(
        "restore_parts_ms".into(),
        restore_parts(&c.log(), "tpl-cold"),
    );
    let log = c.log();
    out.insert(
        "phases_ms".into(),
        json!({
            "cocoon (template)": crate::phases::phases(&log, "tpl-cold", runs),
            "cocoon (kernel boot)": crate::phases::phases(&log, "kern-cold", runs),
        }),
    );
    out.insert("ten_at_once".into(), dense.into());
    out.insert("idle_pss".into(), pss.into());
    Value::Object(out)
}

/// The figures as Markdown tables.
pub fn markdown(r: &Value) -> String {
    let f = |v: &Value| format!("{:.0}", v.as_f64().unwrap_or(f64::NAN));
    let mut s = format!(
        "First pod of the run: {} ms ({}).\n\n| cold `ctr run --rm … true` | median ms | p90 | min |\n|---|---|---|---|\n",
        f(&r["first_pod_ms"]),
        if r["first_pod_made_the_template"].as_bool() == Some(true) {
            "made the template"
        } else {
            "the template was saved already"
        }
    );
    for (k, v) in r["cold_start_ms"].as_object().into_iter().flatten() {
        s += &format!(
            "| {k} | {} | {} | {} |\n",
            f(&v["median"]),
            f(&v["p90"]),
            f(&v["min"])
        );
    }
    s += "\n| template start, part | median ms | p90 |\n|---|---|---|\n";
    for (k, v) in r["restore_parts_ms"].as_object().into_iter().flatten() {
        s += &format!("| {k} | {} | {} |\n", f(&v["median"]), f(&v["p90"]));
    }
    s += "\n| phase (median ms) | template | kernel boot |\n|---|---|---|\n";
    let (t, k) = (
        &r["phases_ms"]["cocoon (template)"],
        &r["phases_ms"]["cocoon (kernel boot)"],
    );
    for (name, v) in t.as_object().into_iter().flatten() {
        s += &format!(
            "| {name} | {} | {} |\n",
            f(&v["median"]),
            f(&k[name]["median"])
        );
    }
    s += "\n| 10 pods at once | all ready ms | succeeded |\n|---|---|---|\n";
    for (k, v) in r["ten_at_once"].as_object().into_iter().flatten() {
        s += &format!("| {k} | {} | {} |\n", f(&v["all_ready_ms"]), v["succeeded"]);
    }
    s += "\n| idle pods (PSS, plus guest RAM in memory that no process maps) | per pod, 1 pod (MiB) | of which QEMU's PSS | per pod, 10 pods | of which QEMU's PSS |\n|---|---|---|---|---|\n";
    for (k, v) in r["idle_pss"].as_object().into_iter().flatten() {
        s += &format!(
            "| {k} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            v[0]["pss_per_pod_mib"].as_f64().unwrap_or(f64::NAN),
            v[0]["qemu_pss_per_pod_mib"].as_f64().unwrap_or(f64::NAN),
            v[1]["pss_per_pod_mib"].as_f64().unwrap_or(f64::NAN),
            v[1]["qemu_pss_per_pod_mib"].as_f64().unwrap_or(f64::NAN),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restore_parts_are_read_back_from_the_shims_log_lines() {
        let log = "\
x VM tpl-cold-0: restored from template /t/ab (template 0 ms, state loaded 216 ms, devices in 4 ms)
x sandbox tpl-cold-0: agent ready after 458.3ms (BootTimings { vmm_started: 228.5ms, agent_connected: 401ms, agent_ready: 458.5ms })
x VM kern-cold-0: restored from template /t/ab (template 0 ms, state loaded 999 ms, devices in 9 ms)
";
        let p = restore_parts(log, "tpl-cold");
        assert_eq!(p["1 QEMU start + state loaded"]["median"], 216.0);
        assert_eq!(p["2 vsock, virtio-fs, NICs plugged"]["n"], 1);
        assert_eq!(p["0 launch (helpers, restore, devices)"]["median"], 228.5);
        assert_eq!(
            p["3 guest resumed to agent answered (Check + Refresh)"]["median"],
            230.0
        );
        assert_eq!(debug_ms("3.5s"), Some(3500.0));
        assert!((debug_ms("950µs").unwrap() - 0.95).abs() < 1e-9);
    }
}
