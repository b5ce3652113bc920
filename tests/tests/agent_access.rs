//! Only the host side that made a pod can drive its agent (issue #11, item 3): another host
//! user can't even reach the hybrid vsock socket, and a connection that does not open with the
//! pod's key (what a user reaching a kernel-vsock CID has) gets no answer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use cocoon_protocol::agent::CheckRequest;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::auth::AgentKey;
use cocoon_protocol::AGENT_PORT;
use cocoon_tests::{gate, Need, Pod};
use vmm_driver::vsock::{connect_once, VsockEndpoint, VsockTransport};

/// uid/gid `nobody`.
const NOBODY: u32 = 65534;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `Check` over a fresh connection to `ep`: Some(api) if the agent answered.
async fn check(ep: &VsockEndpoint) -> Option<u32> {
    let stream = connect_once(ep, AGENT_PORT).await.ok()?;
    let client = AgentServiceClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::new(stream),
    ));
    let limit = Duration::from_secs(5);
    let req = CheckRequest::new();
    let asked = client.check(ttrpc::context::with_duration(limit), &req);
    match tokio::time::timeout(limit, asked).await {
        Ok(Ok(r)) => Some(r.api_version),
        _ => None,
    }
}

/// The probe binary where `nobody` can run it: a copy in a 0755 temp dir (the checkout may
/// sit below a directory only root can enter).
fn probe_for_nobody() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("cocoon-agent-probe");
    std::fs::copy(env!("CARGO_BIN_EXE_cocoon-agent-probe"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, bin)
}

/// Another host user runs the probe: with hybrid vsock the socket is out of reach (0600 in a
/// 0700 run dir); with kernel vsock it reaches the CID but has no key, so gets no answer.
#[tokio::test]
async fn an_unprivileged_host_user_cannot_call_the_agent() {
    let Some(g) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(g, "access-nobody").await;
    let ep = pod.sb.vm().agent_endpoint().clone();
    assert!(check(&ep).await.is_some(), "the shim's own key must work");
    let (_keep, probe) = probe_for_nobody();
    let target: Vec<String> = match &ep.transport {
        VsockTransport::Hybrid(uds) => {
            assert_eq!(mode(&pod.sb.run_dir()), 0o700, "the run dir");
            assert_eq!(mode(uds), 0o600, "{}", uds.display());
            vec!["hybrid".into(), uds.display().to_string()]
        }
        VsockTransport::Kernel { cid } => vec!["kernel".into(), cid.to_string()],
        VsockTransport::Serial(link) => {
            assert_eq!(mode(&pod.sb.run_dir()), 0o700, "the run dir");
            vec!["serial".into(), link.socket().display().to_string()]
        }
    };
    let out = std::process::Command::new(&probe)
        .args(&target)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    match ep.transport {
        VsockTransport::Hybrid(_) | VsockTransport::Serial(_) => assert!(
            out.status.code() == Some(2) && err.contains("Permission denied"),
            "nobody reached the agent's socket: {:?} {err}",
            out.status
        ),
        VsockTransport::Kernel { .. } => assert!(
            out.status.code() == Some(3),
            "nobody called the agent over kernel vsock: {:?} {err}",
            out.status
        ),
    }
    pod.shutdown().await;
}

/// Root on the host, connecting the way the shim does but without the pod's key (or with
/// another pod's), gets no answer; the right key works on the same VM.
#[tokio::test]
async fn a_connection_without_the_pods_key_gets_no_answer() {
    let Some(g) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let pod = Pod::boot(g, "access-key").await;
    let ep = pod.sb.vm().agent_endpoint().clone();
    assert!(ep.key.is_some(), "the driver made no key");
    let without = VsockEndpoint {
        key: None,
        ..ep.clone()
    };
    assert_eq!(
        check(&without).await,
        None,
        "a connection without a key was served"
    );
    let wrong = VsockEndpoint {
        key: Some(AgentKey::generate().unwrap()),
        ..ep.clone()
    };
    assert_eq!(
        check(&wrong).await,
        None,
        "a connection with a wrong key was served"
    );
    assert_eq!(
        check(&ep).await,
        Some(cocoon_protocol::API_VERSION),
        "the pod's own key"
    );
    // QEMU hands the key over as a fw_cfg item from a 0400 file of the 0700 run dir, so
    // the guest needs no share to learn it; Cloud Hypervisor (no fw_cfg) puts it on the share.
    let fw_cfg_key = pod.sb.run_dir().join("agent-key");
    let shared_key =
        vmm_driver::share::host_dir(&pod.sb.run_dir()).join(cocoon_protocol::auth::KEY_FILE);
    let handed = if fw_cfg_key.exists() {
        assert!(!shared_key.exists(), "the key is on the share as well");
        fw_cfg_key
    } else {
        shared_key
    };
    assert_eq!(mode(&handed), 0o400, "{}", handed.display());
    assert_eq!(
        &std::fs::read(&handed).unwrap()[..],
        ep.key.as_ref().unwrap().as_bytes()
    );
    // The key is not on the kernel command line, which every host user can read.
    let key_hex: String = ep
        .key
        .as_ref()
        .unwrap()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (_, pid) in pod.sb.vm().pids() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&key_hex));
    }
    pod.shutdown().await;
}
