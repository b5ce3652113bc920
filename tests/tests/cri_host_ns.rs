//! Host namespaces a pod VM can't share, asked for through CRI as kubelet does for a pod with
//! `hostNetwork: true` or `hostIPC: true`: refused at RunPodSandbox with the field and the
//! reason, and nothing is left (issue #28). runc runs such pods; Cocoon can't give them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use cocoon_tests::cri::{Cri, HANDLER};
use cocoon_tests::{gate, Need};
use k8s_cri::v1 as cri;

#[tokio::test]
async fn host_ipc_and_host_network_pods_are_refused_by_name() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    for (name, field, words) in [
        ("host-ipc", "ipc", "host's ipc namespace"),
        ("host-net", "network", "host's network namespace"),
    ] {
        let mut config = cri.pod_config(name);
        let ns = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .unwrap();
        match field {
            "ipc" => ns.ipc = cri::NamespaceMode::Node.into(),
            _ => ns.network = cri::NamespaceMode::Node.into(),
        }
        let err = cri.try_run_pod_with(config, HANDLER).await.unwrap_err();
        // The status's message arrives quoted (`\"ipc\"`): match around the quotes.
        assert!(
            err.contains("linux.namespaces has no ") && err.contains(words),
            "{name}: {err}"
        );
    }
    cri.containerd.assert_clean();
}
