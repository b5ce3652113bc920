//! Volumes through the agent API (issue #13): a host directory bound into the share the way
//! the shim binds it (`cocoon_shim::volumes::bind`) reaches a container read-write and
//! read-only; a memory volume (`ephemeral_volumes`) is one guest tmpfs of the asked size,
//! shared by two containers; a `/dev/shm` tmpfs keeps its size.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use cocoon_protocol::agent::{
    CreateContainerRequest, EphemeralVolume, RemoveContainerRequest, StartContainerRequest,
    WaitProcessRequest,
};
use cocoon_protocol::{EPHEMERAL_DIR, GUEST_SHARE};
use cocoon_shim::volumes::{Bind, Placement};
use cocoon_tests::paths::shim_dir;
use cocoon_tests::{ctx, gate, oci_spec, streams, Need, Pod};
use serde_json::json;

const EPHEMERAL: u64 = 8 << 20;
const SHM: u64 = 16 << 20;

/// Runs `script` in container `cid` with the test's mounts; returns its stdout and status.
async fn run(pod: &Pod, cid: &str, script: &str, vol: &str) -> (String, i32) {
    let mut spec = oci_spec(&["sh", "-c", script], false);
    let eph = format!("{EPHEMERAL_DIR}/cache");
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] != "/dev/shm");
    mounts.extend([
        json!({"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]}),
        json!({"destination": "/data-ro", "type": "bind", "source": vol,
               "options": ["rbind", "ro"]}),
        json!({"destination": "/cache", "type": "bind", "source": eph, "options": ["rbind"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "nodev", "noexec", "mode=1777", format!("size={SHM}")]}),
    ]);
    let stdio = streams(false, true, true, false);
    let mut io = pod.io(cid, "", &stdio).await;
    let req = CreateContainerRequest {
        container_id: cid.into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: pod.rootfs(cid),
        stdio: Some(stdio).into(),
        ephemeral_volumes: vec![EphemeralVolume {
            path: eph,
            size_bytes: EPHEMERAL,
            ..Default::default()
        }],
        ..Default::default()
    };
    let agent = pod.sb.agent();
    agent.create_container(ctx(), &req).await.unwrap();
    let start = StartContainerRequest {
        container_id: cid.into(),
        ..Default::default()
    };
    agent.start_container(ctx(), &start).await.unwrap();
    let (out, err) = io.output().await;
    let wait = WaitProcessRequest {
        container_id: cid.into(),
        ..Default::default()
    };
    let status = agent.wait_process(ctx(), &wait).await.unwrap().status;
    let rm = RemoveContainerRequest {
        container_id: cid.into(),
        ..Default::default()
    };
    agent.remove_container(ctx(), &rm).await.unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(status, 0, "{cid}: {out}{}", String::from_utf8_lossy(&err));
    (out, status)
}

#[tokio::test]
async fn binds_from_the_share_and_guest_tmpfs_volumes_reach_containers() {
    let Some(pass) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(pass, "volumes-api").await;
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("in.txt"), "from-host\n").unwrap();
    let slot = pod.sb.host_dir().join("_volumes").join("0");
    let staging = pod.state.path().join("staging-0");
    let bind = Bind {
        source: host.path().to_owned(),
        inode: (0, 0),
        is_dir: true,
        recursive: true,
        readonly: false,
        recursive_readonly: false,
        mount: 0,
    };
    // Into virtiofsd's namespace, as the shim does, with the shim binary as the helper.
    let virtiofsd = pod
        .sb
        .vm()
        .pids()
        .into_iter()
        .find(|(name, _)| *name == vmm_driver::VIRTIOFSD)
        .unwrap()
        .1;
    let at = Placement {
        helper: shim_dir().join("containerd-shim-cocoon-v2"),
        ..Placement::new(virtiofsd, "/_volumes/0".into())
    };
    cocoon_shim::volumes::bind(&bind, &staging, &slot, &at).unwrap();
    let vol = format!("{GUEST_SHARE}/_volumes/0");

    let (out, _) = run(
        &pod,
        "writer",
        "cat /data/in.txt; echo from-guest > /data/out.txt; \
         (echo x > /data-ro/in.txt) 2>/dev/null && echo ro-broken || echo ro-ok; \
         echo kept > /cache/note; stat -f -c '%b %S' /cache /dev/shm",
        &vol,
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["from-host", "ro-ok"], "{out}");
    let size = |l: &str| -> u64 {
        let (blocks, bsize) = l.split_once(' ').unwrap();
        blocks.parse::<u64>().unwrap() * bsize.parse::<u64>().unwrap()
    };
    assert_eq!(size(lines[2]), EPHEMERAL, "the memory volume: {out}");
    assert_eq!(size(lines[3]), SHM, "/dev/shm: {out}");
    assert_eq!(
        std::fs::read_to_string(host.path().join("out.txt")).unwrap(),
        "from-guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("in.txt")).unwrap(),
        "from-host\n"
    );
    // A second container of the pod finds the first one's memory volume, which never
    // reached the host.
    let (out, _) = run(&pod, "reader", "cat /cache/note", &vol).await;
    assert_eq!(out, "kept\n");
    assert!(!host.path().join("note").exists());

    cocoon_shim::volumes::remove_target(&slot);
    let served = std::fs::read_to_string(format!("/proc/{virtiofsd}/mountinfo")).unwrap();
    assert!(
        !served.contains(" /_volumes/0 "),
        "removing the mount point takes the bind away: {served}"
    );
    let _ = std::fs::remove_dir(slot.parent().unwrap());
    pod.shutdown().await;
}
