//! The agent's container calls as tests make them against a [`Pod`]: create and start, exec,
//! wait, kill, remove. Shared by the agent-level suites (`containers.rs`, `conformance.rs`).

use cocoon_protocol::agent::{
    CreateContainerRequest, ExecProcessRequest, RemoveContainerRequest, SignalProcessRequest,
    StartContainerRequest, StdioStreams, WaitProcessRequest,
};

use crate::{ctx, oci_spec, streams, Io, Pod};

/// Creates and starts `cid` running `args`; returns the host ends of its stdio.
pub async fn run(pod: &Pod, cid: &str, spec: serde_json::Value, stdio: StdioStreams) -> Io {
    let io = pod.io(cid, "", &stdio).await;
    create_start(pod, cid, spec, stdio).await;
    io
}

/// Creates and starts `cid`; its stdio streams must already be open.
pub async fn create_start(pod: &Pod, cid: &str, spec: serde_json::Value, stdio: StdioStreams) {
    let rootfs = pod.rootfs(cid);
    let req = CreateContainerRequest {
        container_id: cid.into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs,
        stdio: Some(stdio).into(),
        ..Default::default()
    };
    pod.sb.agent().create_container(ctx(), &req).await.unwrap();
    let start = StartContainerRequest {
        container_id: cid.into(),
        ..Default::default()
    };
    pod.sb.agent().start_container(ctx(), &start).await.unwrap();
}

pub async fn wait(pod: &Pod, cid: &str, eid: &str) -> i32 {
    let req = WaitProcessRequest {
        container_id: cid.into(),
        exec_id: eid.into(),
        ..Default::default()
    };
    pod.sb
        .agent()
        .wait_process(ctx(), &req)
        .await
        .unwrap()
        .status
}

/// Runs `cid` to its end, which must be exit 0 (stderr in the failure), removes it, and
/// returns its stdout.
pub async fn run_output(pod: &Pod, cid: &str, spec: serde_json::Value) -> String {
    let mut io = run(pod, cid, spec, streams(false, true, true, false)).await;
    let (out, err) = io.output().await;
    assert_eq!(
        wait(pod, cid, "").await,
        0,
        "{cid} failed: {}",
        String::from_utf8_lossy(&err)
    );
    remove(pod, cid).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGKILLs the running `cid`, drains its output (`io`), removes it; returns its exit status.
pub async fn kill_and_remove(pod: &Pod, cid: &str, io: &mut Io) -> i32 {
    kill(pod, cid).await;
    io.output().await;
    let status = wait(pod, cid, "").await;
    remove(pod, cid).await;
    status
}

/// SIGKILLs the init of `cid`.
pub async fn kill(pod: &Pod, cid: &str) {
    let sig = SignalProcessRequest {
        container_id: cid.into(),
        signal: 9,
        ..Default::default()
    };
    pod.sb.agent().signal_process(ctx(), &sig).await.unwrap();
}

pub async fn remove(pod: &Pod, cid: &str) {
    let req = RemoveContainerRequest {
        container_id: cid.into(),
        ..Default::default()
    };
    pod.sb.agent().remove_container(ctx(), &req).await.unwrap();
}

pub async fn exec(pod: &Pod, cid: &str, eid: &str, args: &[&str], stdio: StdioStreams) -> Io {
    let process = oci_spec(args, stdio.terminal)["process"].clone();
    exec_process(pod, cid, eid, process, stdio).await
}

/// Starts exec `eid` of `process` (an OCI process object) in `cid`.
pub async fn exec_process(
    pod: &Pod,
    cid: &str,
    eid: &str,
    process: serde_json::Value,
    stdio: StdioStreams,
) -> Io {
    let io = pod.io(cid, eid, &stdio).await;
    let req = ExecProcessRequest {
        container_id: cid.into(),
        exec_id: eid.into(),
        process_json: serde_json::to_vec(&process).unwrap(),
        stdio: Some(stdio).into(),
        ..Default::default()
    };
    pod.sb.agent().exec_process(ctx(), &req).await.unwrap();
    io
}

pub async fn exec_output(pod: &Pod, cid: &str, eid: &str, script: &str) -> String {
    let mut io = exec(
        pod,
        cid,
        eid,
        &["sh", "-c", script],
        streams(false, true, true, false),
    )
    .await;
    let (out, err) = io.output().await;
    assert_eq!(
        wait(pod, cid, eid).await,
        0,
        "exec {script:?} failed: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).into_owned()
}
