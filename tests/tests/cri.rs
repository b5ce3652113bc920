//! Kubernetes pods through containerd's CRI plugin, driven by a Rust CRI client the way kubelet
//! drives it: one VM per pod, several containers in it, and stop + remove that always work.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cocoon_tests::cri::{ContainerSpec, Cri, HANDLER};
use cocoon_tests::{gate, processes_mentioning, Need};

/// Pids of this containerd's processes whose command line contains `what`.
fn pids_of(cri: &Cri, what: &str) -> Vec<i32> {
    processes_mentioning(&cri.containerd.cocoon_state)
        .iter()
        .filter(|p| p.contains(what))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_pod_of_two_containers_shares_one_vm_and_stops_cleanly() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("web", HANDLER).await;
    let web = cri
        .start_container(
            &pod,
            &config,
            ContainerSpec {
                name: "web",
                command: &["sh", "-c", "echo web-says-hello; exec sleep 1000"],
            },
        )
        .await;
    let side = cri
        .start_container(
            &pod,
            &config,
            ContainerSpec {
                name: "side",
                command: &["sleep", "1000"],
            },
        )
        .await;
    assert_eq!(pids_of(&cri, "qemu-system").len(), 1, "one VM for the pod");

    // Both containers answer, with their exit codes, in the same guest.
    let (code, out, _) = cri
        .exec_sync(&web, &["sh", "-c", "echo in-web; exit 3"])
        .await;
    assert_eq!((code, out.trim()), (3, "in-web"));
    let (code, kernel, _) = cri.exec_sync(&side, &["uname", "-r"]).await;
    assert_eq!(code, 0);
    assert!(
        kernel.trim().ends_with("-cloud-amd64"),
        "guest kernel: {kernel:?}"
    );

    // The container's output is in its CRI log file.
    let log = cri.log_dir("web").join("web.log");
    wait_for("web's CRI log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("web-says-hello"))
    })
    .await;

    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}

#[tokio::test]
async fn a_pod_whose_vm_was_killed_still_stops_and_is_removed() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("doomed", HANDLER).await;
    cri.start_container(
        &pod,
        &config,
        ContainerSpec {
            name: "app",
            command: &["sleep", "1000"],
        },
    )
    .await;
    let qemu = pids_of(&cri, "qemu-system");
    assert_eq!(qemu.len(), 1, "one VM for the pod");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("QEMU to go", || pids_of(&cri, "qemu-system").is_empty()).await;

    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}

#[tokio::test]
async fn a_sigtermed_shim_tears_its_pod_down_and_exits() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("term", HANDLER).await;
    cri.start_container(
        &pod,
        &config,
        ContainerSpec {
            name: "app",
            command: &["sleep", "1000"],
        },
    )
    .await;
    let shim: Vec<i32> = processes_mentioning(cri.containerd.dir.path())
        .iter()
        .filter(|p| p.contains("containerd-shim-cocoon-v2"))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(shim.len(), 1, "one shim for the pod");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim[0]),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The shim goes by itself, and takes its VM with it.
    wait_for("the shim to exit on SIGTERM", || {
        processes_mentioning(cri.containerd.dir.path())
            .iter()
            .all(|p| !p.contains("containerd-shim-cocoon-v2") && !p.contains("qemu-system"))
    })
    .await;
    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}
