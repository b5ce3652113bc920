//! Faults don't wedge a pod (issue #15): a helper that dies under a running pod or during its
//! boot takes the VM down with it and the shim's log or the error names it; a frozen guest
//! costs bounded waits and SIGKILL still ends the task; a shim killed during boot leaves
//! nothing after containerd's `shim delete`. Each case ends with nothing left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cocoon_tests::containerd::{bind_mount, Containerd, IMAGE, RUNTIME};
use cocoon_tests::{gate, pids_mentioning, pids_named, signal_all, Need};

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

/// `ctr run -d` arguments for a pod that shares a host directory, so that it is a full pod
/// and runs both helpers (a lean pod has no virtiofsd).
fn run_with_share(share: &std::path::Path, id: &str) -> Vec<String> {
    let mount = bind_mount(share, "/share", "rbind:ro");
    [
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &mount,
        IMAGE,
        id,
        "sleep",
        "1000",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Says why `helper` has no process to kill for this VM; virtiofsd always has one for a pod
/// that shares a host directory.
fn nothing_to_kill(helper: &str) {
    assert_ne!(
        helper, "virtiofsd",
        "a pod sharing a host directory runs virtiofsd"
    );
    eprintln!(
        "{helper}: not running for this VM (kernel vsock or serial channel); nothing to kill"
    );
}

/// The pids of this containerd's VM processes named `comm`.
fn vm_processes(c: &Containerd, comm: &str) -> Vec<i32> {
    pids_named(&c.cocoon_state, comm)
}

/// Short agent bounds for this containerd's pods, so that a frozen guest costs seconds.
fn short_bounds(c: &Containerd) {
    let mut toml = std::fs::read_to_string(&c.cocoon_config).unwrap();
    toml.push_str("[agent]\ncall_timeout_ms = 3000\nstdio_timeout_ms = 3000\n");
    std::fs::write(&c.cocoon_config, toml).unwrap();
}

fn run_detached(c: &Containerd, id: &str) {
    c.run_detached(id, &["sleep", "1000"]);
    wait_until("the task to run", 60, || task_status(c, id) == "RUNNING");
}

/// A frozen guest (QEMU stopped with SIGSTOP, as a hung host or a guest spinning in the kernel
/// looks): exec fails within the configured bound with an error that names the call and the
/// pod, instead of hanging for minutes; SIGKILL still ends the task (the shim stops the VM);
/// `task delete -f` on a second frozen pod clears it too. Before the bounds, exec hung > 120 s.
#[tokio::test]
async fn a_frozen_guest_costs_bounded_waits_and_sigkill_clears_the_pod() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    short_bounds(&c);
    c.import_test_image();
    let id = "frozen";
    run_detached(&c, id);
    let qemu = vm_processes(&c, "qemu-system-x86_64");
    if qemu.is_empty() {
        eprintln!(
            "skipped: the pod's VMM is not QEMU ({:?})",
            cocoon_tests::test_hypervisor()
        );
        let _ = c.ctr(&["task", "rm", "-f", id]);
        let _ = c.ctr(&["containers", "rm", id]);
        return;
    }
    signal_all(&qemu, nix::sys::signal::Signal::SIGSTOP);
    let t0 = Instant::now();
    let out = c.ctr(&["task", "exec", "--exec-id", "e1", id, "true"]);
    let waited = t0.elapsed();
    assert!(!out.status.success(), "exec in a frozen guest succeeded");
    let err = text(&out.stderr);
    assert!(
        waited < Duration::from_secs(30),
        "exec took {waited:?}: {err}"
    );
    assert!(
        err.contains("got no answer within") && err.contains(&format!("pod {id}")),
        "the error must name the call and the pod: {err}"
    );
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    wait_until("the task to stop", 30, || task_status(&c, id) == "STOPPED");
    assert!(
        c.log()
            .contains("stopping the pod VM so that the process ends"),
        "the shim must say why it stopped the VM"
    );
    let out = c.ctr(&["task", "delete", id]);
    assert!(out.status.success(), "task delete: {}", text(&out.stderr));
    assert!(c.ctr(&["containers", "rm", id]).status.success());

    // Frozen, then deleted by force (SIGKILL, then delete) as `docker rm -f` or a kubelet does.
    let id = "frozen-rm";
    run_detached(&c, id);
    signal_all(
        &vm_processes(&c, "qemu-system-x86_64"),
        nix::sys::signal::Signal::SIGSTOP,
    );
    let t0 = Instant::now();
    let out = c.ctr(&["task", "delete", "-f", id]);
    assert!(
        out.status.success(),
        "task delete -f: {}",
        text(&out.stderr)
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert!(c.ctr(&["containers", "rm", id]).status.success());
    c.assert_clean();
}

/// A shim killed while its VM boots: containerd runs `shim delete`, which finds every process
/// the driver had started by then in its crash record and leaves nothing behind.
#[tokio::test]
async fn a_shim_killed_during_boot_leaves_nothing_after_shim_delete() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let id = "shim-dies";
    let address = c.address.clone();
    let run = std::thread::spawn(move || {
        Containerd::ctr_at(
            &address,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                id,
                "sleep",
                "1000",
            ],
        )
    });
    // The VMM has started, the agent has not answered yet (~2 s under TCG).
    wait_until("the VMM to start", 60, || {
        !vm_processes(&c, "qemu-system-x86_64").is_empty()
            || !vm_processes(&c, "cloud-hypervisor").is_empty()
    });
    let shims = pids_mentioning(c.dir.path(), "containerd-shim-cocoon-v2");
    assert!(!shims.is_empty(), "no shim found");
    signal_all(&shims, nix::sys::signal::Signal::SIGKILL);
    let out = run.join().unwrap();
    assert!(!out.status.success(), "run survived its shim");
    // containerd cleans up after the dead shim with `shim delete`.
    let t0 = Instant::now();
    while !pids_mentioning(&c.cocoon_state, "").is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "left running: {:#?}\ncontainerd log:\n{}",
            cocoon_tests::processes_mentioning(&c.cocoon_state),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.ctr(&["task", "delete", id]);
    let out = c.ctr(&["containers", "rm", id]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    c.assert_clean();
}

/// SIGINT to the shim (as SIGTERM, which `cri.rs` checks) tears its pod down and the shim
/// exits by itself, taking the VM with it; the containerd-shim library alone would only log
/// it. containerd then sees the task stopped, and delete leaves nothing.
#[tokio::test]
async fn a_shim_stopped_with_sigint_tears_its_pod_down_and_exits() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let id = "interrupted";
    run_detached(&c, id);
    let shims = pids_mentioning(c.dir.path(), "containerd-shim-cocoon-v2");
    assert_eq!(shims.len(), 1, "one shim for the pod");
    signal_all(&shims, nix::sys::signal::Signal::SIGINT);
    wait_until("the shim and its VM to go", 30, || {
        cocoon_tests::processes_mentioning(c.dir.path())
            .iter()
            .all(|p| !p.contains("containerd-shim-cocoon-v2") && !p.contains("qemu-system"))
    });
    assert!(
        c.log().contains("SIGINT: tearing pod"),
        "the shim must say why it stopped"
    );
    wait_until("the task to stop", 30, || task_status(&c, id) != "RUNNING");
    let _ = c.ctr(&["task", "delete", id]);
    let out = c.ctr(&["containers", "rm", id]);
    assert!(out.status.success(), "rm: {}", text(&out.stderr));
    c.assert_clean();
}

/// A helper that dies while the VM boots fails the create at once with an error that names
/// it, instead of waiting out the agent's connect timeout; nothing is left.
#[tokio::test]
async fn a_helper_that_dies_during_boot_fails_the_create_and_names_itself() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let share = tempfile::tempdir().unwrap();
    for helper in ["virtiofsd", "vhost-device-vsock"] {
        let id = format!("boot-{helper}-dies");
        let address = c.address.clone();
        let args = run_with_share(share.path(), &id);
        let run = std::thread::spawn(move || {
            let t0 = Instant::now();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = Containerd::ctr_at(&address, &args);
            (out, t0.elapsed())
        });
        wait_until("the VMM to start", 60, || {
            !vm_processes(&c, "qemu-system-x86_64").is_empty()
                || !vm_processes(&c, "cloud-hypervisor").is_empty()
        });
        let pids = vm_processes(&c, helper);
        if pids.is_empty() {
            nothing_to_kill(helper);
        }
        signal_all(&pids, nix::sys::signal::Signal::SIGKILL);
        let (out, took) = run.join().unwrap();
        let err = text(&out.stderr);
        if out.status.success() {
            // The agent had answered before the kill landed (or nothing was killed): then it
            // is the running-pod case.
            eprintln!("{helper}: the boot finished first ({took:?}); checking the stop");
            if pids.is_empty() {
                let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
            }
            wait_until("the task to stop", 30, || task_status(&c, &id) == "STOPPED");
            let _ = c.ctr(&["task", "delete", &id]);
        } else {
            assert!(
                err.contains(&format!("{helper} exited")),
                "the error must name {helper}: {err}"
            );
            assert!(
                took < Duration::from_secs(25),
                "create took {took:?}: {err}"
            );
        }
        let out = c.ctr(&["containers", "rm", &id]);
        assert!(out.status.success(), "rm: {}", text(&out.stderr));
    }
    c.assert_clean();
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
    let share = tempfile::tempdir().unwrap();
    for helper in ["virtiofsd", "vhost-device-vsock"] {
        let id = format!("victim-{helper}");
        let args = run_with_share(share.path(), &id);
        let out = c.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "run -d: {}", text(&out.stderr));
        wait_until("the task to run", 60, || task_status(&c, &id) == "RUNNING");
        // The helper's own processes (virtiofsd is two: the sandboxed one is its child), by
        // name: QEMU's command line mentions both helpers' sockets.
        let pids = vm_processes(&c, helper);
        if pids.is_empty() {
            nothing_to_kill(helper);
        }
        // virtiofsd's sandboxed child may die with its parent before its own kill arrives.
        signal_all(&pids, nix::sys::signal::Signal::SIGKILL);
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
