//! What an operator is shown of a pod (`cocoon ps`, through `crate::admin`): read from the
//! pod's state under its lock, never from the guest, so a frozen guest can't hold it up.

use serde::Serialize;

use super::{Pod, VmFacts};

/// A pod and its VM, if it has one now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodFacts {
    pub sandbox_id: String,
    pub vm: Option<VmView>,
    /// The pod's containers, by id, sorted.
    pub containers: Vec<String>,
}

/// A running VM: its facts, its host processes and where its boot's time went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmView {
    #[serde(flatten)]
    pub facts: VmFacts,
    /// The VMM's pid: what containerd reports as every process's pid.
    pub vmm_pid: Option<u32>,
    /// (name, pid) of the VMM and its helpers.
    pub pids: Vec<(String, u32)>,
    /// Host time from the boot's start to the VMM answering, and to the agent answering.
    pub vmm_started_ms: Option<u64>,
    pub agent_ready_ms: Option<u64>,
}

impl Pod {
    /// The pod as it is now.
    pub async fn facts(&self) -> PodFacts {
        let id = self.id().to_owned();
        self.with_state(|s| {
            let mut containers: Vec<String> = s.containers.keys().cloned().collect();
            containers.sort();
            PodFacts {
                sandbox_id: id,
                vm: s.vm.as_ref().map(|vm| {
                    let times = vm.boot_times();
                    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(0);
                    VmView {
                        facts: vm.facts(),
                        vmm_pid: vm.reported_pid(),
                        pids: vm.host_pids(),
                        vmm_started_ms: times.map(|t| ms(t.vmm_started)),
                        agent_ready_ms: times.map(|t| ms(t.agent_ready)),
                    }
                }),
                containers,
            }
        })
        .await
    }
}
