//! Pods without virtiofsd (issue #29, item 4): a pod whose containers bind no host directory
//! and have their rootfs as layer disks runs no virtiofsd and no share; a pod that binds one
//! gets them, at boot or, for a later container, plugged in while it runs. Real containerd,
//! real VMs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use cocoon_tests::containerd::{bind_mount, Containerd, IMAGE, RUNTIME};
use cocoon_tests::cri::{ContainerSpec, Cri, HANDLER};
use cocoon_tests::leaks::pids_named;
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn exec(c: &Containerd, id: &str, exec_id: &str, script: &str) -> String {
    let out = c.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    text(&out.stdout)
}

#[tokio::test]
async fn a_pod_that_binds_nothing_runs_no_virtiofsd_and_one_that_binds_a_directory_does() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let lean = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "lean",
        "sleep",
        "600",
    ]);
    assert!(lean.status.success(), "{}\n{}", text(&lean.stderr), c.log());
    assert_eq!(pids_named(&c.cocoon_state, "qemu-system-x86").len(), 1);
    assert!(
        pids_named(&c.cocoon_state, "virtiofsd").is_empty(),
        "a pod with nothing to share runs virtiofsd"
    );
    // Its container reads its image and writes its root filesystem.
    let out = exec(
        &c,
        "lean",
        "rw",
        "echo kept > /etc/written && cat /etc/written && test -x /bin/busybox && echo image; \
         grep -c ' virtiofs ' /proc/mounts || true",
    );
    assert_eq!(out, "kept\nimage\n0\n", "no virtio-fs mount in the guest");

    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("from-host"), "host-data\n").unwrap();
    let mount = bind_mount(data.path(), "/data", "rbind:rw");
    let full = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &mount,
        IMAGE,
        "full",
        "sleep",
        "600",
    ]);
    assert!(full.status.success(), "{}\n{}", text(&full.stderr), c.log());
    // virtiofsd's sandbox is a parent and a child; each pod's mention its run dir.
    assert!(
        !pids_named(&c.cocoon_state.join("full"), "virtiofsd").is_empty(),
        "the pod with a host directory has its virtiofsd"
    );
    assert!(
        pids_named(&c.cocoon_state.join("lean"), "virtiofsd").is_empty(),
        "the lean pod still has none"
    );
    assert_eq!(
        exec(&c, "full", "cat", "cat /data/from-host"),
        "host-data\n"
    );
    // A pod may ask for its share from the start, and only that way.
    let forced = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.cocoon.share=always",
        IMAGE,
        "forced",
        "sleep",
        "600",
    ]);
    assert!(
        forced.status.success(),
        "{}\n{}",
        text(&forced.stderr),
        c.log()
    );
    assert!(
        !pids_named(&c.cocoon_state.join("forced"), "virtiofsd").is_empty(),
        "io.cocoon.share=always"
    );
    let bad = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.cocoon.share=never",
        IMAGE,
        "bad",
        "true",
    ]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("io.cocoon.share"));
    for id in ["lean", "full", "forced"] {
        c.kill_and_remove(id);
    }
    c.assert_clean();
}

#[tokio::test]
async fn a_lean_pod_gets_the_share_plugged_in_for_a_later_container_with_a_host_directory() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("grows", HANDLER).await;
    let first = cri
        .try_start_container_with(
            &pod,
            &config,
            ContainerSpec {
                name: "first",
                command: &["sleep", "1000"],
            },
            vec![],
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));
    let state = cri.containerd.cocoon_state.clone();
    assert_eq!(pids_named(&state, "qemu-system-x86").len(), 1);
    assert!(
        pids_named(&state, "virtiofsd").is_empty(),
        "the pause and app containers bind nothing of the host: no virtiofsd"
    );
    let (code, out, err) = cri
        .exec_sync(
            &first,
            &["sh", "-c", "cat /etc/hostname; echo x > /x && cat /x"],
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "grows\nx\n"), "{err}");

    // A later container binds a host directory: the share is plugged in for it.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("from-host"), "host-data\n").unwrap();
    let second = cri
        .try_start_container_with(
            &pod,
            &config,
            ContainerSpec {
                name: "second",
                command: &["sleep", "1000"],
            },
            vec![k8s_cri::v1::Mount {
                container_path: "/data".into(),
                host_path: volume.path().to_string_lossy().into_owned(),
                ..Default::default()
            }],
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));
    let fsd = pids_named(&state, "virtiofsd");
    assert!(
        !fsd.is_empty(),
        "virtiofsd started for the second container"
    );
    let (code, out, err) = cri
        .exec_sync(
            &second,
            &[
                "sh",
                "-c",
                "cat /data/from-host; echo back > /data/from-pod",
            ],
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "host-data\n"), "{err}");
    assert_eq!(
        std::fs::read_to_string(volume.path().join("from-pod")).unwrap(),
        "back\n"
    );
    // The late virtiofsd is accounted like the VM's other processes: in the pod's cgroup.
    let qemu = pids_named(&state, "qemu-system-x86");
    let cgroup = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory = |s: String| {
        s.lines()
            .find(|l| l.contains(":memory:") || l.starts_with("0::"))
            .map(str::to_owned)
    };
    assert_eq!(memory(cgroup(fsd[0])), memory(cgroup(qemu[0])));

    cri.stop_and_remove_pod(&pod).await;
    assert!(
        pids_named(&state, "virtiofsd").is_empty(),
        "the late virtiofsd is reaped with its pod"
    );
}
