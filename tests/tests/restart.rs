//! A containerd restarted under running pods (an upgrade, a crash) finds every Cocoon task
//! again, and an exit that happened while it was away is not lost (issue #28). Runs against
//! the containerd under test: PATH's, or `COCOON_TEST_CONTAINERD_BIN` (e.g. containerd 2.x).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};

const RUNC: &str = "io.containerd.runc.v2";
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ctr task ls`'s line for `id`: `TASK PID STATUS`.
fn task_line(c: &Containerd, id: &str) -> Option<(u32, String)> {
    let ls = c.ctr(&["task", "ls"]);
    text(&ls.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_owned()))
    })
}

fn wait_until(what: &str, c: &Containerd, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}\ncontainerd log:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn pods_survive_a_containerd_restart_and_an_exit_meanwhile_is_delivered() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    // Trace level: containerd logs each event a shim forwards ("event forwarded"; 1.x at debug).
    let mut c = Containerd::start_configured(cocoon_tests::test_hypervisor(), |_| {
        "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[debug]\n  level = \"trace\"\n"
            .to_owned()
    });
    c.import_test_image();
    let run = |runtime: &str, id: &str, cmd: &[&str]| {
        let mut a = vec!["run", "-d", "--runtime", runtime, IMAGE, id];
        a.extend_from_slice(cmd);
        let out = c.ctr(&a);
        assert!(out.status.success(), "run {id}: {}", text(&out.stderr));
    };
    run(RUNTIME, "keep", &["sleep", "1000"]);
    let (keep_pid, status) = task_line(&c, "keep").expect("keep is listed");
    assert_eq!(status, "RUNNING");
    run(RUNC, "brief-runc", &["sleep", "3"]);
    run(RUNTIME, "brief", &["sleep", "3"]);

    c.stop();
    let logged_before = c.log().len();
    // The "brief" tasks exit while containerd is away: Cocoon's TaskExit can't be delivered now.
    std::thread::sleep(Duration::from_secs(6));
    c.start_again();

    let (pid, status) = task_line(&c, "keep").unwrap_or_else(|| {
        panic!(
            "the running task is lost after the restart\ncontainerd log:\n{}",
            c.log()
        )
    });
    assert_eq!((pid, status.as_str()), (keep_pid, "RUNNING"));
    // A task that ended while containerd was away: containerd 1.x lists it STOPPED; 2.x takes a
    // stopped task without pids for a leaked shim and deletes it at once. Either way, as
    // runc's twin of it.
    let settled = |id: &str| {
        let t0 = Instant::now();
        loop {
            let st = task_line(&c, id).map(|(_, s)| s);
            if st.as_deref() != Some("RUNNING") || t0.elapsed() > Duration::from_secs(30) {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let runc_brief = settled("brief-runc");
    assert_ne!(runc_brief.as_deref(), Some("RUNNING"));
    assert_eq!(settled("brief"), runc_brief, "cocoon's task against runc's");
    wait_until(
        "the exit held during the restart to be forwarded",
        &c,
        || {
            c.log()[logged_before..]
                .lines()
                .any(|l| l.contains("event forwarded") && l.contains("topic=/tasks/exit"))
        },
    );

    // Every call still reaches the pod.
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "keep",
        "echo",
        "still-here",
    ]);
    assert_eq!(
        text(&out.stdout),
        "still-here\n",
        "exec: {}",
        text(&out.stderr)
    );
    let metrics = c.ctr(&["task", "metrics", "keep"]);
    assert!(
        metrics.status.success(),
        "metrics: {}",
        text(&metrics.stderr)
    );
    let ps = c.ctr(&["task", "ps", "keep"]);
    assert!(ps.status.success(), "ps: {}", text(&ps.stderr));
    let kill = c.ctr(&["task", "kill", "-s", "SIGKILL", "keep"]);
    assert!(kill.status.success(), "kill: {}", text(&kill.stderr));
    wait_until("keep to stop", &c, || {
        task_line(&c, "keep").is_some_and(|(_, s)| s == "STOPPED")
    });
    for id in ["keep", "brief", "brief-runc"] {
        if task_line(&c, id).is_some() {
            let del = c.ctr(&["task", "delete", id]);
            assert!(
                del.status.success(),
                "task delete {id}: {}",
                text(&del.stderr)
            );
        }
        let del = c.ctr(&["containers", "delete", id]);
        assert!(
            del.status.success(),
            "containers delete {id}: {}",
            text(&del.stderr)
        );
    }
    c.assert_clean();
}

/// The kubelet's view: containerd (with CRI) restarted under a running Cocoon pod. CRI
/// recovers the pod from the shim (State, Wait), the container is still running, an exec
/// reaches it, and the pod stops and is removed as usual.
#[tokio::test]
async fn a_cri_pod_survives_a_containerd_restart() {
    use cocoon_tests::cri::{connect, ContainerSpec, Cri, HANDLER};
    use k8s_cri::v1 as cri;
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut c = Cri::start().await;
    let (pod, config) = c.run_pod("survivor", HANDLER).await;
    let app = ContainerSpec {
        name: "app",
        command: &["sleep", "1000"],
    };
    let id = c.start_container(&pod, &config, app).await;
    assert_eq!(c.exec_sync(&id, &["echo", "before"]).await.1, "before\n");

    c.containerd.stop();
    c.containerd.start_again();
    c.client = connect(&c.containerd.address).await;

    // containerd answers before its CRI plugin has recovered; kubelet retries until it has.
    let t0 = Instant::now();
    let status = loop {
        let req = cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        };
        match c.client.container_status(req).await {
            Ok(r) => break r,
            Err(e) if e.message().contains("not initialized") => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "CRI did not come back: {e}\n{}",
                    c.containerd.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "ContainerStatus after the restart: {e}\n{}",
                c.containerd.log()
            ),
        }
    }
    .into_inner()
    .status
    .unwrap();
    // Once seen CONTAINER_EXITED here (1 run in ~6, containerd 1.6): the status and
    // containerd's log (the shim's lines included) say why, next time.
    assert_eq!(
        status.state(),
        cri::ContainerState::ContainerRunning,
        "after the restart: {status:?}\n{}",
        c.containerd.log()
    );
    let pods = c
        .client
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    let ours = pods
        .iter()
        .find(|p| p.id == pod)
        .expect("the pod is listed");
    assert_eq!(
        ours.state(),
        cri::PodSandboxState::SandboxReady,
        "{ours:?}\n{}",
        c.containerd.log()
    );
    assert_eq!(c.exec_sync(&id, &["echo", "after"]).await.1, "after\n");
    c.stop_and_remove_pod(&pod).await;
    c.containerd.assert_clean();
}

/// A shim killed while containerd is down (an OOM kill in a node upgrade): containerd can't
/// run the dead shim's `delete` now, and may never if the bundle goes first, so the pod's
/// guard stops the VM and its helpers and removes its run directory at once. containerd, back,
/// finds the task dead and removes it as usual.
#[tokio::test]
async fn a_shim_killed_while_containerd_is_down_leaves_nothing() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut c = Containerd::start();
    c.import_test_image();
    c.run_detached("guarded", &["sleep", "1000"]);
    let run_dir = c.cocoon_state.join("guarded");
    let pod_processes = || cocoon_tests::processes_mentioning(&run_dir);
    let vm = cocoon_tests::pids_named(&run_dir, "qemu-system-x86_64");
    assert_eq!(vm.len(), 1, "one VM: {:#?}", pod_processes());
    let shim = c.shim_pid("guarded");

    c.stop();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    while !pod_processes().is_empty() || run_dir.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "with its shim dead and containerd down, the pod lives on: {:#?}, run dir there: {}",
            pod_processes(),
            run_dir.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    c.start_again();
    let t0 = Instant::now();
    while task_line(&c, "guarded").is_some_and(|(_, s)| s == "RUNNING") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "containerd still takes the task for running\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.ctr(&["task", "delete", "guarded"]);
    let del = c.ctr(&["containers", "delete", "guarded"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    c.assert_clean();
}
