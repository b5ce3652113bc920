//! The agent runs OCI containers inside a real guest (issue #3): each test boots the real
//! image under QEMU, lays a busybox rootfs on the virtio-fs share and drives the agent API.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use cocoon_protocol::agent::{CreateContainerRequest, StartContainerRequest};
use cocoon_shim::sandbox::StdioKind;
use cocoon_tests::agent_calls::{
    create_start, exec, exec_output, exec_process, kill_and_remove, remove, run, wait,
};
use cocoon_tests::{ctx, gate, oci_spec, streams, Need, Pod};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn exit_codes_and_output() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "exits").await;

    let mut io = run(
        &pod,
        "echo",
        oci_spec(&["echo", "hi"], false),
        streams(false, true, true, false),
    )
    .await;
    let (out, err) = io.output().await;
    assert_eq!(wait(&pod, "echo", "").await, 0);
    assert_eq!(String::from_utf8_lossy(&out), "hi\n");
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    remove(&pod, "echo").await;

    let mut io = run(
        &pod,
        "exit3",
        oci_spec(&["sh", "-c", "exit 3"], false),
        streams(false, true, true, false),
    )
    .await;
    io.output().await;
    assert_eq!(wait(&pod, "exit3", "").await, 3);
    remove(&pod, "exit3").await;

    let mut io = run(
        &pod,
        "killed",
        oci_spec(&["sleep", "1000"], false),
        streams(false, true, true, false),
    )
    .await;
    assert_eq!(kill_and_remove(&pod, "killed", &mut io).await, 137);

    pod.shutdown().await;
}

#[tokio::test]
async fn stdin_round_trips_and_streams_stay_separate() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "stdio").await;

    // 8 MiB of pseudo-random bytes through `cat`, byte for byte.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let input: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut io = run(
        &pod,
        "cat",
        oci_spec(&["cat"], false),
        streams(true, true, true, false),
    )
    .await;
    let mut stdin = io.stdin.take().unwrap();
    let data = input.clone();
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.unwrap();
        stdin.shutdown().await.unwrap();
    });
    let (out, err) = io.output().await;
    writer.await.unwrap();
    assert_eq!(wait(&pod, "cat", "").await, 0);
    assert_eq!(out.len(), input.len());
    assert!(out == input, "stdout differs from stdin");
    assert!(err.is_empty());
    remove(&pod, "cat").await;

    let script = "echo to-out; echo to-err >&2; echo more-out; echo more-err >&2";
    let mut io = run(
        &pod,
        "split",
        oci_spec(&["sh", "-c", script], false),
        streams(false, true, true, false),
    )
    .await;
    let (out, err) = io.output().await;
    assert_eq!(wait(&pod, "split", "").await, 0);
    assert_eq!(String::from_utf8_lossy(&out), "to-out\nmore-out\n");
    assert_eq!(String::from_utf8_lossy(&err), "to-err\nmore-err\n");
    remove(&pod, "split").await;

    pod.shutdown().await;
}

#[tokio::test]
async fn exec_sees_the_container_and_ttys_resize() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "exec").await;
    let _init = run(
        &pod,
        "box",
        oci_spec(&["sleep", "1000"], false),
        streams(false, true, true, false),
    )
    .await;

    // The exec shares the container's pid namespace (pid 1 is the init's sleep) and rootfs.
    let script = "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; test -x /bin/busybox && echo rootfs-ok; exit 7";
    let mut io = exec(
        &pod,
        "box",
        "e1",
        &["sh", "-c", script],
        streams(false, true, true, false),
    )
    .await;
    let (out, _) = io.output().await;
    assert_eq!(wait(&pod, "box", "e1").await, 7);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "sleep 1000 \ncocoon-test\nrootfs-ok\n"
    );

    let pids = pod
        .sb
        .agent()
        .list_processes(
            ctx(),
            &cocoon_protocol::agent::ListProcessesRequest {
                container_id: "box".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .pids;
    assert!(!pids.is_empty(), "no processes listed");

    // A terminal: [ -t 0 ] holds, and a resize shows in `stty size`.
    let script = "[ -t 0 ] && echo is-a-tty; read line; stty size";
    let mut io = exec(
        &pod,
        "box",
        "tty",
        &["sh", "-c", script],
        streams(true, true, false, true),
    )
    .await;
    let resize = cocoon_protocol::agent::TtyWinResizeRequest {
        container_id: "box".into(),
        exec_id: "tty".into(),
        rows: 33,
        cols: 77,
        ..Default::default()
    };
    pod.sb.agent().tty_win_resize(ctx(), &resize).await.unwrap();
    let mut stdin = io.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let (out, _) = io.output().await;
    assert_eq!(wait(&pod, "box", "tty").await, 0);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("is-a-tty"), "{out:?}");
    assert!(out.contains("33 77"), "{out:?}");

    remove(&pod, "box").await;
    pod.shutdown().await;
}

#[tokio::test]
async fn cgroup_limits_oom_pause_and_stats() {
    use cocoon_protocol::agent::{
        GetOOMEventRequest, PauseContainerRequest, ResumeContainerRequest, StatsContainerRequest,
        UpdateContainerRequest,
    };
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "cgroups").await;

    // A 64 MiB limit shows in memory.max; going past it gets the process OOM-killed.
    let mut spec = oci_spec(
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max; dd if=/dev/zero of=/dev/null bs=128M count=1",
        ],
        false,
    );
    spec["linux"]["resources"]["memory"] = serde_json::json!({"limit": 64 << 20});
    let oom = tokio::spawn({
        let agent = pod.sb.agent().clone();
        async move {
            agent
                .get_oom_event(ctx(), &GetOOMEventRequest::default())
                .await
        }
    });
    let mut io = run(&pod, "hog", spec, streams(false, true, true, false)).await;
    let (out, _) = io.output().await;
    assert_eq!(
        String::from_utf8_lossy(&out).lines().next(),
        Some("67108864")
    );
    assert_eq!(
        wait(&pod, "hog", "").await,
        137,
        "dd should have been OOM-killed"
    );
    let event = tokio::time::timeout(std::time::Duration::from_secs(10), oom)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "hog");
    remove(&pod, "hog").await;

    // Stats of a busy container, then pause and resume, then an update of its limits.
    let counter = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done & while :; do :; done";
    let mut out = pod
        .sb
        .open_stdio("busy", "", StdioKind::Stdout)
        .await
        .unwrap();
    create_start(
        &pod,
        "busy",
        oci_spec(&["sh", "-c", counter], false),
        streams(false, true, false, false),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let stats = pod
        .sb
        .agent()
        .stats_container(
            ctx(),
            &StatsContainerRequest {
                container_id: "busy".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        stats.cpu_usage_usec > 100_000,
        "cpu {} usec",
        stats.cpu_usage_usec
    );
    assert!(
        stats.memory_usage_bytes > 0 && stats.pids_current >= 2,
        "{stats:?}"
    );

    let freeze = PauseContainerRequest {
        container_id: "busy".into(),
        ..Default::default()
    };
    pod.sb
        .agent()
        .pause_container(ctx(), &freeze)
        .await
        .unwrap();
    // Drain what was written before the freeze, then nothing more may come.
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..20 {
        match tokio::time::timeout(std::time::Duration::from_millis(300), out.read(&mut buf)).await
        {
            Ok(Ok(n)) if n > 0 => {}
            Ok(r) => panic!("stdout ended while paused: {r:?}"),
            Err(_) => break,
        }
    }
    let frozen =
        tokio::time::timeout(std::time::Duration::from_millis(1000), out.read(&mut buf)).await;
    assert!(frozen.is_err(), "output continued while paused");
    let thaw = ResumeContainerRequest {
        container_id: "busy".into(),
        ..Default::default()
    };
    pod.sb.agent().resume_container(ctx(), &thaw).await.unwrap();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), out.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0, "no output after resume");

    let update = UpdateContainerRequest {
        container_id: "busy".into(),
        resources_json: br#"{"memory": {"limit": 100663296}, "pids": {"limit": 50}}"#.to_vec(),
        ..Default::default()
    };
    pod.sb
        .agent()
        .update_container(ctx(), &update)
        .await
        .unwrap();
    let limits = exec_output(
        &pod,
        "busy",
        "limits",
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max",
    )
    .await;
    assert_eq!(limits, "100663296\n50\n");
    // The guest hands free 128 KiB blocks back to the host, not just 2 MiB ones.
    let order = exec_output(
        &pod,
        "busy",
        "reporting",
        "cat /sys/module/page_reporting/parameters/page_reporting_order",
    )
    .await;
    assert_eq!(order, "5\n", "free page reporting order");

    remove(&pod, "busy").await;
    pod.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_the_agent_keeps_serving() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "badinput").await;
    let agent = pod.sb.agent();

    let err = agent
        .start_container(
            ctx(),
            &StartContainerRequest {
                container_id: "ghost".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ghost") && err.contains("not found"), "{err}");

    let rootfs = pod.rootfs("nobin");
    let req = CreateContainerRequest {
        container_id: "nobin".into(),
        oci_spec_json: serde_json::to_vec(&oci_spec(&["/bin/no-such-binary"], false)).unwrap(),
        rootfs,
        ..Default::default()
    };
    let err = agent
        .create_container(ctx(), &req)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-binary"), "{err}");

    for outside in ["../../etc", "/etc"] {
        let req = CreateContainerRequest {
            container_id: "outside".into(),
            oci_spec_json: serde_json::to_vec(&oci_spec(&["true"], false)).unwrap(),
            rootfs: outside.into(),
            ..Default::default()
        };
        let err = agent
            .create_container(ctx(), &req)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the shared directory"), "{err}");
    }

    let req = CreateContainerRequest {
        container_id: "badspec".into(),
        oci_spec_json: b"{\"process\": 5}".to_vec(),
        rootfs: pod.rootfs("badspec"),
        ..Default::default()
    };
    let err = agent
        .create_container(ctx(), &req)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("OCI spec"), "{err}");

    // Still serving, and a failed id can be used again.
    let mut io = run(
        &pod,
        "nobin",
        oci_spec(&["echo", "still here"], false),
        streams(false, true, true, false),
    )
    .await;
    let (out, _) = io.output().await;
    assert_eq!(wait(&pod, "nobin", "").await, 0);
    assert_eq!(String::from_utf8_lossy(&out), "still here\n");
    remove(&pod, "nobin").await;
    // Removed ids can be created again too.
    let mut io = run(
        &pod,
        "nobin",
        oci_spec(&["true"], false),
        streams(false, true, true, false),
    )
    .await;
    io.output().await;
    assert_eq!(wait(&pod, "nobin", "").await, 0);
    remove(&pod, "nobin").await;

    pod.shutdown().await;
}

#[tokio::test]
async fn process_settings_apply_and_close_stdin_ends_input() {
    use cocoon_protocol::agent::CloseStdinRequest;
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "settings").await;

    // env, cwd, user and additional groups from the spec reach the process.
    let mut spec = oci_spec(
        &["sh", "-c", "echo $GREETING; pwd; id -u; id -g; id -G"],
        false,
    );
    spec["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push("GREETING=hello-from-spec".into());
    spec["process"]["cwd"] = "/tmp".into();
    spec["process"]["user"] =
        serde_json::json!({"uid": 65534, "gid": 65534, "additionalGids": [5]});
    let mut io = run(&pod, "who", spec, streams(false, true, true, false)).await;
    let (out, err) = io.output().await;
    assert_eq!(
        wait(&pod, "who", "").await,
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "hello-from-spec\n/tmp\n65534\n65534\n65534 5\n"
    );
    remove(&pod, "who").await;

    // CloseStdin ends the process's input even though the host never half-closed its stream.
    let mut io = run(
        &pod,
        "reader",
        oci_spec(&["cat"], false),
        streams(true, true, true, false),
    )
    .await;
    let mut stdin = io.stdin.take().unwrap();
    stdin.write_all(b"partial input").await.unwrap();
    stdin.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let close = CloseStdinRequest {
        container_id: "reader".into(),
        ..Default::default()
    };
    pod.sb.agent().close_stdin(ctx(), &close).await.unwrap();
    let (out, _) = tokio::time::timeout(std::time::Duration::from_secs(10), io.output())
        .await
        .unwrap();
    assert_eq!(wait(&pod, "reader", "").await, 0);
    assert_eq!(String::from_utf8_lossy(&out), "partial input");
    drop(stdin);
    remove(&pod, "reader").await;

    // Docker and CRI on a host with AppArmor name a host profile (`docker-default`,
    // `cri-containerd.apparmor.d`) for the container and each exec; runc loads it into the
    // host's kernel. The guest's kernel has no such profile, and the VM is the boundary: the
    // container and its exec run.
    let mut spec = oci_spec(&["sleep", "1000"], false);
    spec["process"]["apparmorProfile"] = "docker-default".into();
    let mut io = run(&pod, "confined", spec, streams(false, true, true, false)).await;
    let mut process = oci_spec(&["true"], false)["process"].clone();
    process["apparmorProfile"] = "docker-default".into();
    let stdio = streams(false, true, true, false);
    let mut eio = exec_process(&pod, "confined", "e", process, stdio).await;
    let (_, err) = eio.output().await;
    assert_eq!(
        wait(&pod, "confined", "e").await,
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(kill_and_remove(&pod, "confined", &mut io).await, 137);

    pod.shutdown().await;
}
