//! Host namespaces a pod VM can't give: a container that asks to share the host's network or
//! IPC namespace is refused at Create with the field and the reason, where runc would simply
//! leave that namespace out. (The host's PID and UTS namespaces have a faithful meaning in a
//! VM, the guest's own, and CRI's hostPID pods get it.)
//!
//! In an OCI spec, "share the host's" is the absence of the namespace from
//! `linux.namespaces`: kubelet's `hostNetwork`/`hostIPC`, `docker run --network host` /
//! `--ipc host` and `ctr run --net-host` all produce that.

/// A host namespace a pod VM can't share, and why.
struct HostOnly {
    kind: &'static str,
    asked_by: &'static str,
    why: &'static str,
}

const HOST_ONLY: [HostOnly; 2] = [
    HostOnly {
        kind: "network",
        asked_by: "docker run --network host, ctr run --net-host, a hostNetwork pod",
        why: "a pod VM has its own network stack and can't share the host's interfaces; use a \
              bridge network with published ports instead",
    },
    HostOnly {
        kind: "ipc",
        asked_by: "docker run --ipc host, a hostIPC pod",
        why: "System V IPC and POSIX message queues live in a kernel, and the pod's kernel is \
              the VM's, not the host's; drop hostIPC, or run the pod under runc",
    },
];

/// Refuses a spec that leaves out a namespace the VM can't share with the host.
pub fn check(spec: &serde_json::Value) -> Result<(), String> {
    let nss = spec["linux"]["namespaces"].as_array();
    for h in &HOST_ONLY {
        let has = nss.is_some_and(|nss| nss.iter().any(|ns| ns["type"] == h.kind));
        if !has {
            return Err(format!(
                "linux.namespaces has no \"{}\" entry, so the container asks for the host's {} \
                 namespace ({}): {}",
                h.kind, h.kind, h.asked_by, h.why
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(kinds: &[&str]) -> serde_json::Value {
        let nss: Vec<_> = kinds.iter().map(|k| json!({"type": k})).collect();
        json!({"linux": {"namespaces": nss}})
    }

    #[test]
    fn host_network_and_host_ipc_are_refused_by_name() {
        assert!(check(&spec(&["pid", "ipc", "uts", "mount", "network"])).is_ok());
        // CRI containers join the sandbox's namespaces by path: not the host's.
        let joined = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "mount"}
        ]}});
        assert!(check(&joined).is_ok());
        let e = check(&spec(&["pid", "uts", "mount", "network"])).unwrap_err();
        assert!(
            e.contains("no \"ipc\" entry") && e.contains("hostIPC"),
            "{e}"
        );
        let e = check(&spec(&["pid", "ipc", "uts", "mount"])).unwrap_err();
        assert!(e.contains("host's network namespace"), "{e}");
        // hostPID is the guest's PID namespace: allowed.
        assert!(check(&spec(&["ipc", "uts", "mount", "network"])).is_ok());
        assert!(check(&json!({})).is_err());
    }
}
