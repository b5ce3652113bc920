//! The calls answered from the container's cgroup v2 through libcgroups: ListProcesses,
//! StatsContainer and UpdateContainer.

use std::path::PathBuf;

use cocoon_protocol::agent::StatsContainerResponse;
use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};

use super::{Failure, Manager, Res};
use crate::spec;

impl Manager {
    /// The manager of a known container's cgroup (`spec::adapt` put it at `/cocoon/<id>`).
    fn cgroup(&self, id: &str) -> Res<AnyCgroupManager> {
        self.get(id)?;
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: PathBuf::from(spec::cgroup_path(id)),
            systemd_cgroup: false,
            container_name: id.to_owned(),
        })
        .map_err(|e| Failure::Failed(format!("cgroup of {id}: {e}")))
    }

    pub fn pids(&self, id: &str) -> Res<Vec<u32>> {
        let pids = self
            .cgroup(id)?
            .get_all_pids()
            .map_err(|e| Failure::Failed(format!("list pids: {e}")))?;
        Ok(pids
            .into_iter()
            .filter_map(|p| u32::try_from(p.as_raw()).ok())
            .collect())
    }

    pub fn stats(&self, id: &str) -> Res<StatsContainerResponse> {
        let s = self
            .cgroup(id)?
            .stats()
            .map_err(|e| Failure::Failed(format!("stats: {e}")))?;
        // cgroup v2 says "max" for no limit, which libcgroups reads as u64::MAX; the API says 0.
        let limit = |v: u64| if v == u64::MAX { 0 } else { v };
        Ok(StatsContainerResponse {
            cpu_usage_usec: s.cpu.usage.usage_total,
            cpu_user_usec: s.cpu.usage.usage_user,
            cpu_system_usec: s.cpu.usage.usage_kernel,
            memory_usage_bytes: s.memory.memory.usage,
            memory_limit_bytes: limit(s.memory.memory.limit),
            memory_anon_bytes: s.memory.stats.get("anon").copied().unwrap_or(0),
            memory_file_bytes: s.memory.stats.get("file").copied().unwrap_or(0),
            pids_current: s.pids.current,
            pids_limit: limit(s.pids.limit),
            ..Default::default()
        })
    }

    /// Applies new OCI `LinuxResources` (JSON) to the running container's cgroup.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Res<()> {
        let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| Failure::Invalid(format!("resources are not valid: {e}")))?;
        let opt = ControllerOpt {
            resources: &r,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        self.cgroup(id)?
            .apply(&opt)
            .map_err(|e| Failure::Failed(format!("update: {e}")))
    }
}
