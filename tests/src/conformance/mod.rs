//! critest, the CRI validation suite of kubernetes-sigs/cri-tools, against runc and Cocoon
//! side by side on one private containerd, offline: [`images`] builds what the specs pull,
//! [`registry`] serves it on loopback under the upstream names, [`report`] reads ginkgo's
//! reports and sets the two runtimes' results against each other. `scripts/conformance.sh`
//! (`make conformance`) builds critest from a cri-tools checkout and runs
//! `cocoon-conformance`; docs/conformance.md has the recorded result.

pub mod images;
pub mod registry;
pub mod report;

use std::path::Path;

use crate::config::test_hypervisor;
use crate::containerd::Containerd;
use crate::cri::{cri_config, TestNet};

/// The sandbox image CRI starts each pod with: the one critest's image specs also pull and
/// remove, so containerd must be able to pull it again.
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.9";

/// containerd with CRI for critest: the runc and cocoon handlers, the test's own bridge
/// network with portmap (for the hostPort specs), and registry mirrors from `certs_d`.
pub fn start_containerd(net: &TestNet, certs_d: &Path) -> Containerd {
    Containerd::start_configured(test_hypervisor(), |d| {
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).unwrap();
        let mut list: serde_json::Value =
            serde_json::from_str(&net.conflist(&d.join("ipam"))).unwrap();
        list["plugins"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}}));
        std::fs::write(cni.join("10-cocoon-test.conflist"), list.to_string()).unwrap();
        format!(
            "{}  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{}\"\n",
            cri_config(d, SANDBOX_IMAGE),
            certs_d.display()
        )
    })
}
