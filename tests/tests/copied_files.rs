//! The small per-pod files that kubelet and containerd bind into every container (the pod's
//! `/etc/hosts`, `resolv.conf`, `hostname`, configMap/secret/projected volumes) are copied
//! into the guest by the agent instead of crossing virtio-fs, and a host change reaches the
//! container within about a second; kubelet's termination log goes back to its host file when
//! the container exits; such a pod runs no virtiofsd (issue #29). Real containerd CRI, real VMs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_tests::cri::{ContainerSpec, Cri, HANDLER};
use cocoon_tests::leaks::pids_named;
use cocoon_tests::{gate, Need};

/// How long a host change may take to show in the container, polls included: the shim polls
/// every second, and one `exec` under TCG takes a few hundred ms.
const UPDATE_WITHIN: Duration = Duration::from_secs(4);

/// kubelet's atomic writer: the data in a new `..<ts>` directory, `..data` swapped to it by
/// rename, each key a symlink through `..data`; the old directory removed.
fn atomic_write(dir: &Path, ts: &str, key: &str, value: &str) {
    let data = dir.join(ts);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(key), value).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(ts, &tmp).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join(key).exists() {
        std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).unwrap();
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// Runs `cmd` in `container` until its output is `want`; returns how long that took.
async fn until_output(cri: &mut Cri, container: &str, cmd: &str, want: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let (_, out, _) = cri.exec_sync(container, &["sh", "-c", cmd]).await;
        if out == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < UPDATE_WITHIN,
            "`{cmd}` still says {out:?}, not {want:?}, {:?} after the host change",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_kubelet_style_pod_needs_no_share_its_copies_follow_the_host_and_its_termination_log_comes_back(
) {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("files", HANDLER).await;
    // kubelet's layout for a pod: its etc-hosts, a configMap volume.
    let kubelet = tempfile::tempdir().unwrap();
    let pod_dir = kubelet.path().join("pods/uid-files");
    let cm = pod_dir.join("volumes/kubernetes.io~configmap/settings");
    std::fs::create_dir_all(&cm).unwrap();
    atomic_write(&cm, "..2026_12_05_1", "mode", "one\n");
    let hosts = pod_dir.join("etc-hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let termination_log = |name: &str| {
        let dir = pod_dir.join("containers").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("3f9a1c2b");
        std::fs::write(&log, "").unwrap();
        log
    };
    let app_log = termination_log("app");
    let mounts = vec![
        k8s_cri::v1::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: app_log.to_string_lossy().into_owned(),
            ..Default::default()
        },
        k8s_cri::v1::Mount {
            container_path: "/etc/config".into(),
            host_path: cm.to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        },
        k8s_cri::v1::Mount {
            container_path: "/etc/hosts".into(),
            host_path: hosts.to_string_lossy().into_owned(),
            ..Default::default()
        },
    ];
    let app = cri
        .try_start_container_with(
            &pod,
            &config,
            ContainerSpec {
                name: "app",
                command: &["sleep", "1000"],
            },
            mounts,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));

    let (code, out, err) = cri
        .exec_sync(
            &app,
            &[
                "sh",
                "-c",
                "cat /etc/config/mode /etc/hosts; \
                 for m in /etc/config /etc/hosts /etc/resolv.conf /etc/hostname; do \
                   grep \" $m \" /proc/mounts | cut -d' ' -f3; done; \
                 touch /etc/config/x 2>/dev/null && echo config-writable; \
                 echo '10.9.9.9 from-container' >> /etc/hosts",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["one", "127.0.0.1 localhost"], "{out}");
    assert_eq!(
        lines[2..6],
        ["tmpfs"; 4],
        "guest copies, not virtio-fs:\n{out}"
    );
    assert!(
        !out.contains("config-writable"),
        "a read-only volume: {out}"
    );
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1 localhost\n",
        "the container's write stays in the pod"
    );

    // kubelet updates the configMap: a new directory and a symlink swap.
    atomic_write(&cm, "..2026_12_05_2", "mode", "two\n");
    let took = until_output(&mut cri, &app, "cat /etc/config/mode", "two\n").await;
    eprintln!("configMap update seen in the container after {took:?}");
    let (_, listing, _) = cri
        .exec_sync(&app, &["sh", "-c", "ls -a /etc/config | tr '\\n' ' '"])
        .await;
    assert_eq!(
        listing, ". .. ..2026_12_05_2 ..data mode ",
        "the old version goes"
    );

    // kubelet rewrites etc-hosts in place; the bind in the container shows it.
    std::fs::write(&hosts, "127.0.0.1 localhost\n10.1.2.3 peer\n").unwrap();
    let took = until_output(&mut cri, &app, "grep -c peer /etc/hosts", "1\n").await;
    eprintln!("etc-hosts update seen in the container after {took:?}");

    // kubelet's pod files, volumes and termination log need no shared filesystem.
    assert!(
        pids_named(&cri.containerd.cocoon_state, "virtiofsd").is_empty(),
        "a pod of copied files runs virtiofsd"
    );
    // A container's termination message reaches kubelet's file once it exits.
    let ender_log = termination_log("ender");
    cri.try_start_container_with(
        &pod,
        &config,
        ContainerSpec {
            name: "ender",
            command: &[
                "sh",
                "-c",
                "echo 'ended: out of cheese' > /dev/termination-log; exit 3",
            ],
        },
        vec![k8s_cri::v1::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: ender_log.to_string_lossy().into_owned(),
            ..Default::default()
        }],
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));
    let t0 = Instant::now();
    while std::fs::read_to_string(&ender_log).unwrap() != "ended: out of cheese\n" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the termination message never reached the host file"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&app_log).unwrap(),
        "",
        "app still runs"
    );

    cri.stop_and_remove_pod(&pod).await;
}
