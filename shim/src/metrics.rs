//! What the shim counts of its pod for `cocoon monitor` (`GET /stats`, `crate::admin`): the
//! latency and errors of each agent call, kept as a histogram per call name. The monitor
//! turns a snapshot into Prometheus text; the shim keeps no Prometheus state of its own, so
//! that one scrape of many pods is one family per metric (`cli/src/monitor.rs`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bucket bounds in seconds: a healthy call under TCG takes milliseconds, a container create
/// hundreds of them, and the bound (`agent.call_timeout_ms`) is 30 s.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// One call name's histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallSnapshot {
    pub call: String,
    pub count: u64,
    pub errors: u64,
    pub sum_seconds: f64,
    /// Calls at or under each of [`BUCKETS`], cumulative.
    pub buckets: Vec<(f64, u64)>,
}

#[derive(Debug, Default)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    count: u64,
    errors: u64,
    sum: f64,
}

/// Every agent call of the pod, by name.
#[derive(Debug, Default)]
pub struct CallStats {
    calls: Mutex<BTreeMap<&'static str, Hist>>,
}

impl CallStats {
    pub fn record(&self, call: &'static str, took: Duration, ok: bool) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let h = calls.entry(call).or_default();
        let s = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            h.counts[i] += 1;
        }
        h.count += 1;
        h.sum += s;
        if !ok {
            h.errors += 1;
        }
    }

    pub fn snapshot(&self) -> Vec<CallSnapshot> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls
            .iter()
            .map(|(name, h)| {
                let mut acc = 0;
                CallSnapshot {
                    call: (*name).to_owned(),
                    count: h.count,
                    errors: h.errors,
                    sum_seconds: h.sum,
                    buckets: BUCKETS
                        .iter()
                        .zip(h.counts)
                        .map(|(b, n)| {
                            acc += n;
                            (*b, acc)
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_cumulative_buckets() {
        let s = CallStats::default();
        s.record("Check", Duration::from_micros(500), true);
        s.record("Check", Duration::from_millis(30), false);
        s.record("Check", Duration::from_secs(60), false);
        let snap = s.snapshot();
        assert_eq!(snap.len(), 1);
        let c = &snap[0];
        assert_eq!((c.call.as_str(), c.count, c.errors), ("Check", 3, 2));
        assert_eq!(c.buckets[0], (0.001, 1));
        assert_eq!(c.buckets[5], (0.05, 2));
        // Past the last bound: only in count (+Inf), as Prometheus has it.
        assert_eq!(c.buckets.last(), Some(&(30.0, 2)));
        assert!((c.sum_seconds - 60.0305).abs() < 1e-9);
    }
}

/// User plus system CPU seconds of `pids` (`/proc/<pid>/stat`), those that still exist.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| stat_ticks(&s))
        .map(|t| t as f64 / hz)
        .sum()
}

/// utime + stime: fields 14 and 15, counted after the command's closing parenthesis (the
/// command itself may hold spaces and parentheses).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Proportional set size of `pids` together (`/proc/<pid>/smaps_rollup`), in bytes.
pub fn pss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command() {
        let stat = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(stat_ticks(stat), Some(300));
    }

    #[test]
    fn this_process_is_counted() {
        let me = [std::process::id()];
        assert!(pss_bytes(&me) > 0);
        assert!(cpu_seconds(&me) >= 0.0);
    }
}
