//! What the CRI validation suite (critest) checks of a runtime, at the agent, in a real guest
//! (issue #28): each case failed under Cocoon while runc passed it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use cocoon_tests::agent_calls::{
    exec_output, exec_process, kill_and_remove, remove, run, run_output, wait,
};
use cocoon_tests::{gate, oci_spec, streams, Need, Pod};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// A profile that lets everything through but `sethostname`, like critest's "profile that
/// blocks sethostname".
fn blocks_sethostname() -> serde_json::Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    })
}

fn with_caps(mut process: serde_json::Value, caps: &[&str]) -> serde_json::Value {
    for set in ["bounding", "effective", "permitted"] {
        let list = process["capabilities"][set].as_array_mut().unwrap();
        list.extend(caps.iter().map(|c| json!(c)));
    }
    process
}

#[tokio::test]
async fn execs_get_the_containers_seccomp_filter() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "seccomp").await;
    let mut spec = oci_spec(&["sleep", "1000"], false);
    spec["process"] = with_caps(spec["process"].clone(), &["CAP_SYS_ADMIN"]);
    spec["linux"]["seccomp"] = blocks_sethostname();
    let mut init = run(&pod, "box", spec, streams(false, true, true, false)).await;

    let probe = "grep Seccomp: /proc/self/status; hostname changed 2>/dev/null || echo refused";
    // With CAP_SYS_ADMIN the exec could set the hostname but for the filter; without it, the
    // filter needs no_new_privs to be loaded at all. Both must be filtered, as under runc.
    for (eid, caps) in [("admin", &["CAP_SYS_ADMIN"][..]), ("plain", &[][..])] {
        let process = with_caps(
            oci_spec(&["sh", "-c", probe], false)["process"].clone(),
            caps,
        );
        let mut io =
            exec_process(&pod, "box", eid, process, streams(false, true, true, false)).await;
        let (out, err) = io.output().await;
        assert_eq!(
            wait(&pod, "box", eid).await,
            0,
            "{}",
            String::from_utf8_lossy(&err)
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "Seccomp:\t2\nrefused\n",
            "exec {eid} escaped the container's seccomp profile"
        );
    }
    assert_eq!(
        exec_output(&pod, "box", "name", "hostname").await,
        "cocoon-test\n"
    );
    kill_and_remove(&pod, "box", &mut init).await;
    pod.shutdown().await;
}

#[tokio::test]
async fn a_terminal_exec_works_with_cri_length_ids() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "tty-ids").await;
    // CRI's ids: 64 hex characters each, as `kubectl exec -it` makes them.
    let cid = "c".repeat(64);
    let eid = "e".repeat(64);
    let mut init = run(
        &pod,
        &cid,
        oci_spec(&["sleep", "1000"], false),
        streams(false, true, true, false),
    )
    .await;
    let process = oci_spec(
        &[
            "sh",
            "-c",
            "[ -t 0 ] && echo is-a-tty; read line; echo got-$line",
        ],
        true,
    )["process"]
        .clone();
    let mut io = exec_process(&pod, &cid, &eid, process, streams(true, true, false, true)).await;
    let mut stdin = io.stdin.take().unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    let (out, _) = io.output().await;
    assert_eq!(wait(&pod, &cid, &eid).await, 0);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("is-a-tty") && out.contains("got-hello"),
        "{out:?}"
    );
    kill_and_remove(&pod, &cid, &mut init).await;
    pod.shutdown().await;
}

#[tokio::test]
async fn setuid_programs_raise_privileges_unless_no_new_privileges() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "setuid").await;
    // `/bin/euid` is setuid root in the test image; the process runs as uid 1000.
    for (cid, nnp, euid) in [("esc", false, "0\n"), ("nnp", true, "1000\n")] {
        let mut spec = oci_spec(&["/bin/euid"], false);
        spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
        spec["process"]["noNewPrivileges"] = json!(nnp);
        assert_eq!(
            run_output(&pod, cid, spec).await,
            euid,
            "noNewPrivileges {nnp}: the effective uid after a setuid-root program"
        );
    }
    pod.shutdown().await;
}

#[tokio::test]
async fn a_process_can_reopen_its_stdout_and_stderr_as_under_runc() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "reopen").await;
    // nginx's image logs to /dev/stdout; `tee /dev/stderr` is common in scripts. Both reopen
    // the fd through /proc/self/fd, which works on runc's pipes and fails (ENXIO) on a socket.
    // The burst after it checks that the relay delivers everything written just before exit.
    let script = "echo out > /dev/stdout && echo err > /dev/stderr && \
                  [ -p /proc/self/fd/1 ] && echo fifo && head -c 300000 /dev/zero | tr '\\0' x";
    let mut io = run(
        &pod,
        "box",
        oci_spec(&["sh", "-c", script], false),
        streams(false, true, true, false),
    )
    .await;
    let (out, err) = io.output().await;
    assert_eq!(
        wait(&pod, "box", "").await,
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(out.len(), "out\nfifo\n".len() + 300_000);
    assert!(out.starts_with(b"out\nfifo\nxxx") && out.ends_with(b"xxx"));

    let mut init = run(
        &pod,
        "sleeper",
        oci_spec(&["sleep", "1000"], false),
        streams(false, true, true, false),
    )
    .await;
    assert_eq!(
        exec_output(&pod, "sleeper", "reopen", "echo exec > /dev/stdout").await,
        "exec\n"
    );
    kill_and_remove(&pod, "sleeper", &mut init).await;
    remove(&pod, "box").await;
    pod.shutdown().await;
}

#[tokio::test]
async fn recursive_root_propagation_is_accepted() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "propagation").await;
    // CRI asks for rshared/rslave when a mount is Bidirectional/HostToContainer, and Docker for
    // rslave when a bind holds its own root; runc takes every mount(8) propagation name.
    for (cid, prop, tag) in [
        ("rshared", "rshared", "shared:"),
        ("rslave", "rslave", "master:"),
        ("rprivate", "rprivate", ""),
    ] {
        let mut spec = oci_spec(&["sh", "-c", "grep ' / / ' /proc/self/mountinfo"], false);
        spec["linux"]["rootfsPropagation"] = json!(prop);
        let line = run_output(&pod, cid, spec).await;
        if tag.is_empty() {
            assert!(
                !line.contains("shared:") && !line.contains("master:"),
                "{prop}: {line}"
            );
        } else {
            assert!(line.contains(tag), "{prop}: the root is not {tag} {line}");
        }
    }
    pod.shutdown().await;
}

#[tokio::test]
async fn a_mounts_own_propagation_is_applied_as_under_runc() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "mount-propagation").await;
    // One writable directory of the share that three containers bind, as a pod's volume (a
    // bind onto itself under the read-only export, as the shim makes volumes).
    let pvol = pod.sb.host_dir().join("pvol");
    std::fs::create_dir_all(&pvol).unwrap();
    let none: Option<&str> = None;
    nix::mount::mount(Some(&pvol), &pvol, none, nix::mount::MsFlags::MS_BIND, none).unwrap();
    let source = format!("{}/pvol", cocoon_protocol::GUEST_SHARE);
    // CRI's words: Bidirectional is an `rshared` mount in an `rshared` root, HostToContainer
    // an `rslave` one in an `rslave` root, None `rprivate`.
    let with_volume = |args: &[&str], propagation: &str| {
        let mut spec = oci_spec(args, false);
        if propagation != "rprivate" {
            spec["linux"]["rootfsPropagation"] = json!(propagation);
        }
        spec["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/vol", "type": "bind", "source": source,
            "options": ["rbind", "rw", propagation]
        }));
        spec
    };
    let sleep = ["sleep", "1000"];
    let mut slave = run(
        &pod,
        "slave",
        with_volume(&sleep, "rslave"),
        streams(false, true, true, false),
    )
    .await;
    let mut private = run(
        &pod,
        "private",
        with_volume(&sleep, "rprivate"),
        streams(false, true, true, false),
    )
    .await;
    let mut spec = with_volume(
        &[
            "sh",
            "-c",
            "mkdir -p /vol/m && mount -t tmpfs m /vol/m && echo mounted; sleep 1000",
        ],
        "rshared",
    );
    spec["process"] = with_caps(spec["process"].clone(), &["CAP_SYS_ADMIN"]);
    let mut shared = run(&pod, "shared", spec, streams(false, true, true, false)).await;
    let looks = std::sync::atomic::AtomicUsize::new(0);
    let seen = |cid: &'static str| {
        let (pod, n) = (
            &pod,
            looks.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        async move {
            let script = "grep -c ' /vol/m ' /proc/self/mountinfo || true";
            exec_output(pod, cid, &format!("look{n}"), script).await
        }
    };
    let t0 = std::time::Instant::now();
    while seen("shared").await.trim() != "1" {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the shared container never mounted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        seen("slave").await.trim(),
        "1",
        "an rslave volume receives the pod's mounts"
    );
    assert_eq!(
        seen("private").await.trim(),
        "0",
        "an rprivate volume shares nothing"
    );
    for (cid, io) in [
        ("slave", &mut slave),
        ("private", &mut private),
        ("shared", &mut shared),
    ] {
        kill_and_remove(&pod, cid, io).await;
    }
    nix::mount::umount2(&pvol, nix::mount::MntFlags::MNT_DETACH).unwrap();
    pod.shutdown().await;
}

#[tokio::test]
async fn privileged_containers_get_kernel_modules_on_demand() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "modules").await;
    // Each of these makes the guest kernel ask for a module the boot did not load (bridge,
    // dummy, veth); under runc the host's modprobe loads it.
    let script = "brctl addbr cbr0 && echo bridge-ok; brctl delbr cbr0; \
                  ip link add cdummy0 type dummy && echo dummy-ok; ip link del cdummy0; \
                  ip link add cveth0 type veth peer name cveth1 && echo veth-ok; ip link del cveth0";
    let mut spec = oci_spec(&["sh", "-c", script], false);
    spec["process"] = with_caps(spec["process"].clone(), &["CAP_NET_ADMIN"]);
    let mut io = run(&pod, "netadmin", spec, streams(false, true, true, false)).await;
    let (out, err) = io.output().await;
    wait(&pod, "netadmin", "").await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        "bridge-ok\ndummy-ok\nveth-ok\n",
        "{}",
        String::from_utf8_lossy(&err)
    );
    remove(&pod, "netadmin").await;
    pod.shutdown().await;
}
