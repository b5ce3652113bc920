//! `cocoon ps`: every pod VM on the host, as its shim describes it (`GET /info`), with the
//! host memory of the pod's processes read from `/proc`. Shims are asked all at once, each
//! bounded, so a stopped or wedged one costs the listing at most the bound and shows as an
//! error row.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client;

/// The admin endpoint's file name after the sandbox id: `shim/src/state.rs`'s
/// `ADMIN_SUFFIX`, which is the contract between the two.
pub const ADMIN_SUFFIX: &str = ".admin.sock";

/// A shim's `GET /info`.
#[derive(Debug, Deserialize)]
struct Info {
    namespace: String,
    shim_pid: u32,
    sandbox_id: String,
    vm: Option<Vm>,
    containers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Vm {
    hypervisor: String,
    vcpus: u32,
    memory_mib: u32,
    from_template: bool,
    ram_cloned: bool,
    started_unix_ms: u64,
    vmm_pid: Option<u32>,
    pids: Vec<(String, u32)>,
}

/// One line of the listing; `--json` prints these.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Row {
    pub sandbox_id: String,
    pub namespace: Option<String>,
    pub shim_pid: Option<u32>,
    /// The VMM's pid; None while the pod has no VM.
    pub vmm_pid: Option<u32>,
    pub hypervisor: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// `template` (restored from the VM template) or `kernel boot`.
    pub start: Option<String>,
    /// The guest's RAM maps the template's copy-on-write.
    pub ram_cloned: Option<bool>,
    pub uptime_s: Option<u64>,
    /// Proportional set size of the shim, the VMM and its helpers, in KiB.
    pub pss_kib: Option<u64>,
    pub containers: Vec<String>,
    /// (name, pid) of the VMM and its helpers.
    pub pids: Vec<(String, u32)>,
    /// Why the shim gave no description (no answer in time, refused).
    pub error: Option<String>,
}

/// The admin endpoints in `state_dir`, by sandbox id, sorted.
pub fn endpoints(state_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let id = name.strip_suffix(ADMIN_SUFFIX)?.to_owned();
            Some((id, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Asks every shim at once, each within `limit`.
pub async fn rows(state_dir: &Path, limit: Duration) -> Vec<Row> {
    let asks = endpoints(state_dir)
        .into_iter()
        .map(|(id, socket)| async move {
            match client::get(&socket, "/info", limit).await {
                Ok(body) => match serde_json::from_slice::<Info>(&body) {
                    Ok(info) => row(info, now_unix_ms()),
                    Err(e) => failed(id, format!("bad answer: {e}")),
                },
                Err(e) => failed(id, format!("{e:#}")),
            }
        });
    futures_util::future::join_all(asks).await
}

fn failed(sandbox_id: String, error: String) -> Row {
    Row {
        sandbox_id,
        error: Some(error),
        ..Row::default()
    }
}

fn row(info: Info, now_ms: u64) -> Row {
    let mut r = Row {
        sandbox_id: info.sandbox_id,
        namespace: Some(info.namespace),
        shim_pid: Some(info.shim_pid),
        containers: info.containers,
        ..Row::default()
    };
    let mut pids = vec![info.shim_pid];
    if let Some(vm) = info.vm {
        pids.extend(vm.pids.iter().map(|(_, p)| *p));
        r.vmm_pid = vm.vmm_pid;
        r.hypervisor = Some(vm.hypervisor);
        r.vcpus = Some(vm.vcpus);
        r.memory_mib = Some(vm.memory_mib);
        r.start = Some(
            if vm.from_template {
                "template"
            } else {
                "kernel boot"
            }
            .into(),
        );
        r.ram_cloned = Some(vm.ram_cloned);
        r.uptime_s = Some(now_ms.saturating_sub(vm.started_unix_ms) / 1000);
        r.pids = vm.pids;
    }
    r.pss_kib = pss_kib(&pids);
    r
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// The summed `Pss` of `pids` (`/proc/<pid>/smaps_rollup`); None if none could be read.
fn pss_kib(pids: &[u32]) -> Option<u64> {
    let read: Vec<u64> = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| rollup_pss(&s))
        .collect();
    (!read.is_empty()).then(|| read.iter().sum())
}

fn rollup_pss(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup.lines().find_map(|l| {
        l.strip_prefix("Pss:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The listing as a table.
pub fn table(rows: &[Row]) -> String {
    let mut lines = vec![[
        "SANDBOX",
        "NAMESPACE",
        "VMM PID",
        "VCPUS",
        "MEMORY",
        "START",
        "UPTIME",
        "PSS",
        "CONTAINERS",
    ]
    .map(str::to_owned)
    .to_vec()];
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in rows {
        if let Some(e) = &r.error {
            lines.push(vec![r.sandbox_id.clone(), format!("error: {e}")]);
            continue;
        }
        lines.push(vec![
            r.sandbox_id.clone(),
            opt(r.namespace.clone()),
            opt(r.vmm_pid.map(|p| p.to_string())),
            opt(r.vcpus.map(|v| v.to_string())),
            opt(r.memory_mib.map(|m| format!("{m} MiB"))),
            opt(r.start.clone()),
            opt(r.uptime_s.map(human_duration)),
            opt(r.pss_kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))),
            r.containers.len().to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .filter(|l| l.len() == lines[0].len())
                .map(|l| l[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| match l.len() == widths.len() && i + 1 < l.len() {
                true => format!("{c:<w$}", w = widths[i]),
                false => c.clone(),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human_duration(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_info_answer_becomes_a_row() {
        let info: Info = serde_json::from_str(
            r#"{"namespace":"k8s.io","shim_pid":4294967290,"sandbox_id":"p1",
                "vm":{"hypervisor":"qemu","vcpus":2,"memory_mib":512,"from_template":true,
                      "ram_cloned":true,"started_unix_ms":1000,"vmm_pid":4294967291,
                      "pids":[["qemu",4294967291]],"vmm_started_ms":60,"agent_ready_ms":200},
                "containers":["a","b"]}"#,
        )
        .unwrap();
        let r = row(info, 91_000);
        assert_eq!(r.vmm_pid, Some(4294967291));
        assert_eq!(r.start.as_deref(), Some("template"));
        assert_eq!(r.uptime_s, Some(90));
        assert_eq!(r.containers.len(), 2);
        // No such processes: no figure rather than a zero.
        assert_eq!(r.pss_kib, None);
        let t = table(&[r, failed("p2".into(), "no answer within 2000 ms".into())]);
        assert!(
            t.contains("p1") && t.contains("k8s.io") && t.contains("512 MiB"),
            "{t}"
        );
        assert!(t.contains("1m30s"), "{t}");
        assert!(t.contains("p2  error: no answer within 2000 ms"), "{t}");
    }

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let text = "00400000-7ffd [rollup]\nRss:  2048 kB\nPss:  1536 kB\nPss_Anon: 1 kB\n";
        assert_eq!(rollup_pss(text), Some(1536));
        assert_eq!(rollup_pss("Rss: 1 kB\n"), None);
        assert!(pss_kib(&[std::process::id()]).is_some_and(|k| k > 0));
    }

    #[test]
    fn endpoints_are_the_admin_sockets() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "p1.admin.sock",
            "p0.admin.sock",
            "p1.admin.tmp-12",
            "state.json",
        ] {
            std::fs::write(d.path().join(f), "").unwrap();
        }
        std::fs::create_dir(d.path().join("p1")).unwrap();
        let ids: Vec<String> = endpoints(d.path()).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["p0", "p1"]);
    }
}
