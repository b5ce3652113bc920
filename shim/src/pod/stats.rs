//! What `cocoon monitor` scrapes of a pod (`GET /stats`, through `crate::admin`): its facts,
//! what its host processes use, the guest's own view of memory and CPU (one agent call,
//! bounded by the caller: a frozen guest costs a scrape that bound, and only its guest part),
//! and the agent calls' latency.

use std::time::Duration;

use cocoon_protocol::agent as ag;
use serde::{Deserialize, Serialize};

use super::{Pod, PodFacts};
use crate::metrics::CallSnapshot;

/// A pod's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct PodStats {
    #[serde(flatten)]
    pub facts: PodFacts,
    /// OOM kills in the pod's containers.
    pub oom_events: u64,
    /// The VM's host processes (VMM and helpers), when it has some.
    pub host: Option<HostUsage>,
    /// The guest's view, when its agent answered in time.
    pub guest: Option<GuestUsage>,
    /// Why `guest` is missing.
    pub guest_error: Option<String>,
    pub agent_calls: Vec<CallSnapshot>,
}

/// The VM's host processes together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostUsage {
    /// User and system CPU time since they started.
    pub cpu_seconds: f64,
    /// Proportional set size: shared pages (a template's RAM) split between their users.
    pub pss_bytes: u64,
}

/// The guest kernel's counts (`agent/src/guest_stats.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestUsage {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub cpu_busy_seconds: f64,
    pub cpu_idle_seconds: f64,
}

impl Pod {
    /// The pod's numbers; the guest gets `guest_limit` to answer.
    pub async fn pod_stats(&self, guest_limit: Duration) -> PodStats {
        let facts = self.facts().await;
        let (oom_events, link) = self.with_state(|s| (s.oom_events, s.guest().ok())).await;
        let host = facts.vm.as_ref().map(|vm| {
            let pids: Vec<u32> = vm.pids.iter().map(|(_, p)| *p).collect();
            HostUsage {
                cpu_seconds: crate::metrics::cpu_seconds(&pids),
                pss_bytes: crate::metrics::pss_bytes(&pids),
            }
        });
        let (mut guest, mut guest_error, mut agent_calls) = (None, None, Vec::new());
        match link {
            None => guest_error = Some("the pod has no running VM".to_owned()),
            Some(link) => {
                let req = ag::GuestStatsRequest::new();
                let asked = link.agent.guest_stats(link.ctx(), &req);
                match tokio::time::timeout(guest_limit, link.call("GuestStats", asked)).await {
                    Ok(Ok(r)) => {
                        guest = Some(GuestUsage {
                            mem_total_bytes: r.mem_total_kib * 1024,
                            mem_available_bytes: r.mem_available_kib * 1024,
                            cpu_busy_seconds: r.cpu_busy_usec as f64 / 1e6,
                            cpu_idle_seconds: r.cpu_idle_usec as f64 / 1e6,
                        })
                    }
                    Ok(Err(e)) => guest_error = Some(e.to_string()),
                    Err(_) => {
                        guest_error = Some(format!(
                            "the agent did not answer within {} ms",
                            guest_limit.as_millis()
                        ))
                    }
                }
                agent_calls = link.bounds.calls.snapshot();
            }
        }
        PodStats {
            facts,
            oom_events,
            host,
            guest,
            guest_error,
            agent_calls,
        }
    }
}
