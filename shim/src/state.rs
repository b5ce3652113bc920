//! `<state_dir>/<sandbox>/state.json`: what `shim delete` needs to clean up after a shim or VM
//! crash: the host processes of the VM and the rootfs mounts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The sandbox's host-side footprint.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub sandbox_id: String,
    /// (name, pid) of qemu, virtiofsd, vhost-device-vsock.
    pub pids: Vec<(String, u32)>,
    /// (pid, start time) of the same, from `/proc/<pid>/stat`: a pid that names a process
    /// started at another time was reused and is not ours.
    #[serde(default)]
    pub starts: Vec<(u32, u64)>,
    /// Container rootfs mount points on the host.
    pub mounts: Vec<PathBuf>,
    /// The cgroup the VM's processes joined (`placement`), removed once they are gone.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The pid of the shim that booted the VM: the pod's guard (`guard.rs`) leaves a run
    /// directory that a later shim of the same name took over alone.
    #[serde(default)]
    pub shim: Option<u32>,
}

pub const FILE: &str = "state.json";

/// The admin endpoint's file name after the sandbox id (`crate::admin`).
pub const ADMIN_SUFFIX: &str = ".admin.sock";

/// Where the admin endpoint of the pod whose run directory is `run_dir` is: beside it,
/// `<state_dir>/<sandbox>.admin.sock`.
pub fn admin_socket(run_dir: &Path) -> PathBuf {
    let mut name = run_dir.file_name().unwrap_or_default().to_os_string();
    name.push(ADMIN_SUFFIX);
    run_dir.with_file_name(name)
}

impl SandboxState {
    pub fn load(run_dir: &Path) -> Option<SandboxState> {
        let text = std::fs::read_to_string(run_dir.join(FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Written atomically: a crash mid-write must not lose the previous state.
    pub fn save(&self, run_dir: &Path) -> std::io::Result<()> {
        let tmp = run_dir.join(".state.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, run_dir.join(FILE))
    }
}

/// Kills what is left of a sandbox, unmounts its rootfs mounts and the share, and removes its
/// directory. For `shim delete` after a crash; safe to run on a sandbox that is already gone.
/// Only the recorded mount points are unmounted, without following symlinks.
pub fn cleanup(run_dir: &Path) {
    crate::network::own::remove_at(&crate::network::own::path_for(run_dir));
    let _ = std::fs::remove_file(admin_socket(run_dir));
    // No state.json: the shim died before the VM answered. The driver's own record still
    // lists every process it started by then.
    let st = SandboxState::load(run_dir).unwrap_or_default();
    let recorded = vmm_driver::recorded_processes(run_dir)
        .into_iter()
        .map(|r| (r.name, r.pid, r.start));
    let from_state = st.pids.iter().map(|(name, pid)| {
        let start = st.starts.iter().find(|(p, _)| p == pid).map(|(_, s)| *s);
        (name.clone(), *pid, start)
    });
    let mut seen = std::collections::BTreeSet::new();
    for (name, raw, started) in recorded.chain(from_state) {
        if !seen.insert(raw) {
            continue;
        }
        let Ok(pid) = i32::try_from(raw) else {
            continue;
        };
        let ours = match started {
            Some(started) => start_time(raw) == Some(started),
            None => {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&*run_dir.to_string_lossy())
            }
        };
        if ours {
            log::info!("killing leftover {name} (pid {pid})");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for m in &st.mounts {
        crate::unmount::unmount(m);
    }
    if let Some(cg) = &st.cgroup {
        crate::placement::remove_leftover(cg);
    }
    vmm_driver::share::unexport(run_dir);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = run_dir.to_string_lossy().into_owned();
    if mounts.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| mp.starts_with(&prefix))
    }) {
        log::warn!(
            "{} still has mounts below it; leaving it in place",
            run_dir.display()
        );
        return;
    }
    let _ = std::fs::remove_dir_all(run_dir);
}

pub use vmm_driver::start_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_is_told_apart_by_its_start_time() {
        let me = std::process::id();
        let started = start_time(me).unwrap();
        assert!(started > 0);
        assert_eq!(start_time(me), Some(started));
        assert_eq!(start_time(u32::MAX - 1), None);
        // A child started later has a later (or equal, within a tick) start time.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let child_start = start_time(child.id()).unwrap();
        assert!(child_start >= started);
        // Recorded with a wrong start time, cleanup leaves the process alone.
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("sb");
        std::fs::create_dir_all(&run).unwrap();
        let st = SandboxState {
            sandbox_id: "sb".into(),
            pids: vec![("qemu".into(), child.id())],
            starts: vec![(child.id(), child_start + 1)],
            mounts: vec![],
            cgroup: None,
            shim: None,
        };
        st.save(&run).unwrap();
        cleanup(&run);
        assert!(
            child.try_wait().unwrap().is_none(),
            "a reused pid was killed"
        );
        child.kill().unwrap();
        let _ = child.wait();
    }

    #[test]
    fn round_trip_and_cleanup_of_a_dead_sandbox() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("sb");
        std::fs::create_dir_all(run.join("shared/c1/rootfs")).unwrap();
        let st = SandboxState {
            sandbox_id: "sb".into(),
            pids: vec![("qemu".into(), u32::MAX - 1)],
            starts: vec![],
            mounts: vec![],
            cgroup: None,
            shim: None,
        };
        st.save(&run).unwrap();
        assert_eq!(SandboxState::load(&run), Some(st));
        cleanup(&run);
        assert!(!run.exists());
        cleanup(&run); // already gone: fine
    }
}
