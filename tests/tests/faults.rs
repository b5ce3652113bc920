//! Faults don't wedge a pod (issue #15): a helper that dies under a running pod takes the VM
//! down with it, the task ends, the shim's log names the helper, and delete leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::{gate, pids_mentioning, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn task_status(c: &Containerd, id: &str) -> String {
    text(&c.ctr(&["task", "ls"]).stdout)
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_owned()
}

/// Before supervision, a killed virtiofsd left the task running with every file request in
/// the guest hanging: exec hung, delete failed, and the VM outlived containerd.
#[tokio::test]
async fn a_dead_helper_stops_its_vm_and_the_pod_cleans_up() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    for helper in ["virtiofsd", "vhost-device-vsock"] {
        let id = format!("victim-{helper}");
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            &id,
            "sleep",
            "1000",
        ]);
        assert!(out.status.success(), "run -d: {}", text(&out.stderr));
        wait_until("the task to run", 60, || task_status(&c, &id) == "RUNNING");
        // The helper's own processes (virtiofsd is two: the sandboxed one is its child), by
        // name: QEMU's command line mentions both helpers' sockets.
        let comm = &helper[..helper.len().min(15)];
        let pids: Vec<i32> = pids_mentioning(&c.cocoon_state, helper)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect();
        if pids.is_empty() {
            eprintln!("{helper}: not running for this VM (kernel vsock?); nothing to kill");
        }
        for pid in &pids {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
        if !pids.is_empty() {
            wait_until("the task to stop", 30, || task_status(&c, &id) == "STOPPED");
            // The supervisor looks every 250 ms; the task may have ended first (a dead
            // vhost-device-vsock cuts the agent off at once).
            let said = || {
                c.log().lines().any(|l| {
                    l.contains(&format!("{helper} (pid ")) && l.contains("exited; stopping the VM")
                })
            };
            wait_until("the shim's log line naming the helper", 10, said);
            // The pod's VM is gone with it.
            wait_until("the VM to go", 10, || {
                pids_mentioning(&c.cocoon_state, "qemu-system").is_empty()
            });
        } else {
            let out = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            wait_until("the task to stop", 30, || task_status(&c, &id) == "STOPPED");
        }
        let out = c.ctr(&["task", "delete", &id]);
        assert!(out.status.success(), "task delete: {}", text(&out.stderr));
        let out = c.ctr(&["containers", "rm", &id]);
        assert!(out.status.success(), "rm: {}", text(&out.stderr));
    }
    c.assert_clean();
}
