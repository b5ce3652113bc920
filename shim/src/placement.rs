//! Where a pod VM's host processes are accounted (issue #11, item 5). Under runc a pod's
//! processes sit in the cgroup the runtime spec names and carry the OOM score the kubelet (or
//! Docker) chose; a VM that stayed in the shim's cgroup with containerd's `oom_score_adj`
//! (-998 on Debian) would escape the pod's limits and be the last thing the kernel kills.
//!
//! - **cgroup.** The VMM and its helpers join the `cgroupsPath` of the pod's first container:
//!   CRI's sandbox path below the pod's cgroup parent, Docker's or `ctr`'s container path, as
//!   runc would place that container. A spec without one puts them in `/cocoon/<sandbox>`. No
//!   resource limit is written there: the container's limits apply inside the guest, and the
//!   VM needs more than its workload. The pod-level limits of the parent cgroup bind.
//!   systemd-style paths (`slice:prefix:name`) are expanded to the cgroupfs path systemd gives
//!   them. [`libcgroups`] (youki's) does the cgroup v1/v2 work.
//! - **OOM score.** Each container's `process.oomScoreAdj` raises the VM's processes to it, so
//!   they are never harder to kill than the most killable container of the pod.

use std::path::{Path, PathBuf};

use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager};
use nix::unistd::Pid;

/// Where VMs go whose spec names no cgroup.
pub const DEFAULT_PARENT: &str = "/cocoon";

/// The cgroup the VM of `sandbox` joins, given its first container's spec.
pub fn cgroup_path(spec: &serde_json::Value, sandbox: &str) -> PathBuf {
    match spec["linux"]["cgroupsPath"].as_str() {
        Some(p) if !p.is_empty() => expand(p),
        _ => Path::new(DEFAULT_PARENT).join(sandbox),
    }
}

/// A cgroupfs path for an OCI `cgroupsPath`: absolute ones as they are, relative ones below the
/// root, systemd's `slice:prefix:name` as systemd lays it out
/// (`a-b.slice` → `a.slice/a-b.slice`, then `prefix-name.scope`).
fn expand(p: &str) -> PathBuf {
    let parts: Vec<&str> = p.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Path::new("/").join(p.trim_start_matches('/'));
    };
    let mut out = PathBuf::from("/");
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    if slice != "-.slice" {
        let stem = slice.trim_end_matches(".slice");
        let mut acc = String::new();
        for (i, piece) in stem.split('-').enumerate() {
            if i > 0 {
                acc.push('-');
            }
            acc.push_str(piece);
            out.push(format!("{acc}.slice"));
        }
    }
    out.push(if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    out
}

/// The VM's cgroup while it runs; removed (when empty) by [`Placement::remove`].
pub struct Placement {
    pub path: PathBuf,
    manager: Option<AnyCgroupManager>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("path", &self.path)
            .field("joined", &self.manager.is_some())
            .finish()
    }
}

impl Placement {
    /// Moves `pids` (the VM's processes) and their children into the cgroup at `path`. A
    /// failure is logged and leaves them where they are: the pod still runs, unaccounted.
    pub fn join(path: PathBuf, pids: &[u32]) -> Placement {
        let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: path.clone(),
            systemd_cgroup: false,
            container_name: String::new(),
        });
        let manager = match manager {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "cgroup {}: {e}; the VM stays in the shim's cgroup",
                    path.display()
                );
                return Placement {
                    path,
                    manager: None,
                };
            }
        };
        for pid in with_children(pids) {
            if let Err(e) = manager.add_task(Pid::from_raw(pid)) {
                log::warn!("cgroup {}: adding pid {pid}: {e}", path.display());
            }
        }
        Placement {
            path,
            manager: Some(manager),
        }
    }

    /// Adds processes the VM started later (a late virtiofsd); those already in stay.
    pub fn add(&self, pids: &[u32]) {
        let Some(m) = &self.manager else {
            return;
        };
        for pid in with_children(pids) {
            if let Err(e) = m.add_task(Pid::from_raw(pid)) {
                log::warn!("cgroup {}: adding pid {pid}: {e}", self.path.display());
            }
        }
    }

    /// Removes the cgroup once the VM's processes are gone.
    pub fn remove(self) {
        if let Some(m) = self.manager {
            if let Err(e) = m.remove() {
                log::warn!("removing cgroup {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes a cgroup left by a shim that died (`shim delete`); its processes were just killed,
/// so this waits a moment for them to leave it.
pub fn remove_leftover(path: &Path) {
    let Ok(m) = libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_owned(),
        systemd_cgroup: false,
        container_name: String::new(),
    }) else {
        return;
    };
    for _ in 0..50 {
        if m.remove().is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    log::warn!("cgroup {} is still busy; left in place", path.display());
}

/// `spec.process.oomScoreAdj`, if the container has one.
pub fn oom_score_adj(spec: &serde_json::Value) -> Option<i32> {
    spec["process"]["oomScoreAdj"]
        .as_i64()
        .and_then(|v| i32::try_from(v).ok())
}

/// Raises every one of `pids` (and their children) to `adj` where it is lower.
pub fn raise_oom_score(pids: &[u32], adj: i32) {
    for pid in with_children(pids) {
        let file = format!("/proc/{pid}/oom_score_adj");
        let now = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if now.is_some_and(|n| n >= adj) {
            continue;
        }
        if let Err(e) = std::fs::write(&file, adj.to_string()) {
            log::warn!("setting {file} to {adj}: {e}");
        }
    }
}

/// `pids` and their direct children (virtiofsd serves from a forked child).
fn with_children(pids: &[u32]) -> Vec<i32> {
    let mut out = vec![];
    for p in pids {
        let Ok(pid) = i32::try_from(*p) else { continue };
        out.push(pid);
        out.extend(vmm_driver::children_of(*p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_follow_the_spec_as_runc_reads_them() {
        let spec = |p: &str| serde_json::json!({"linux": {"cgroupsPath": p}});
        assert_eq!(
            cgroup_path(&spec("/kubepods/besteffort/pod1/abc"), "sb"),
            PathBuf::from("/kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            cgroup_path(&spec("default/abc"), "sb"),
            PathBuf::from("/default/abc")
        );
        assert_eq!(
            cgroup_path(&spec("kubepods-besteffort-pod1.slice:cri-containerd:abc"), "sb"),
            PathBuf::from(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            cgroup_path(&spec("system.slice:docker:abc"), "sb"),
            PathBuf::from("/system.slice/docker-abc.scope")
        );
        assert_eq!(
            cgroup_path(&serde_json::json!({}), "sb"),
            PathBuf::from("/cocoon/sb")
        );
    }

    #[test]
    fn the_oom_score_is_only_ever_raised() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let read = || {
            std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
                .unwrap()
                .trim()
                .parse::<i32>()
                .unwrap()
        };
        raise_oom_score(&[pid], 500);
        assert_eq!(read(), 500);
        raise_oom_score(&[pid], -998);
        assert_eq!(read(), 500, "a lower score must not lower it");
        raise_oom_score(&[pid], 1000);
        assert_eq!(read(), 1000);
        assert_eq!(
            oom_score_adj(&serde_json::json!({"process": {"oomScoreAdj": -997}})),
            Some(-997)
        );
        assert_eq!(oom_score_adj(&serde_json::json!({"process": {}})), None);
        child.kill().unwrap();
        let _ = child.wait();
    }
}
