//! Turning the OCI spec containerd wrote for the host into one that makes sense in the guest.
//!
//! Host-only pieces are dropped: namespace paths (they name host /proc entries), the network
//! namespace (containers share the guest's for now), host device nodes, hooks (host binaries),
//! bind mounts of host paths that do not exist in the guest and the AppArmor profile (a
//! profile loaded into the host's kernel). The cgroup moves under the guest's `/cocoon/<id>`.
//! Everything else that constrains the process stays.

use std::path::Path;

use serde_json::Value;

/// Why a spec was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct SpecError(pub String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The guest cgroup of a container, relative to the cgroup2 root.
pub fn cgroup_path(id: &str) -> String {
    format!("/cocoon/{id}")
}

/// Whether the container's init dying leaves other processes of it alive: unless the spec
/// gives it a PID namespace of its own, the kernel does not kill the rest (CRI's pod-shared
/// PID namespace, or none at all). runc's shim then kills them (`ShouldKillAllOnExit`), and so
/// does the agent, or they would hold the container's stdio open and its exit would never be
/// complete.
pub fn init_exit_leaves_others(spec: &Value) -> bool {
    !spec["linux"]["namespaces"].as_array().is_some_and(|nss| {
        nss.iter()
            .any(|ns| ns["type"] == "pid" && ns["path"].as_str().unwrap_or("").is_empty())
    })
}

/// Namespaces a pod container joins from its sandbox container when the spec says so (by a
/// host path, which means nothing in the guest).
const POD_SHARED: [&str; 3] = ["ipc", "uts", "pid"];

/// Adapts `spec_json` for container `id` with its root at `rootfs` (absolute, in the guest).
/// `pod_holder` is the guest pid of the pod's sandbox container, whose namespaces a spec
/// naming one by path joins. `exists` says whether a guest path exists (injected for tests).
pub fn adapt(
    spec_json: &[u8],
    id: &str,
    rootfs: &Path,
    pod_holder: Option<i32>,
    exists: impl Fn(&str) -> bool,
) -> Result<Value, SpecError> {
    let mut v: Value = serde_json::from_slice(spec_json)
        .map_err(|e| SpecError(format!("the OCI spec is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(SpecError("the OCI spec must be a JSON object".into()));
    }
    let args_ok = v["process"]["args"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    if !args_ok {
        return Err(SpecError(
            "the OCI spec has no process.args: nothing to run".into(),
        ));
    }
    drop_host_profile(&mut v["process"], id);
    let readonly = v["root"]["readonly"].as_bool().unwrap_or(false);
    v["root"] = serde_json::json!({ "path": rootfs, "readonly": readonly });
    if let Some(o) = v.as_object_mut() {
        o.remove("hooks");
    }

    if !v["linux"].is_object() {
        v["linux"] = serde_json::json!({});
    }
    // A container that mounts the cgroup filesystem must find its own cgroup there
    // (memory.max, cpu.max: what JVMs and other runtimes size themselves from), as runc shows
    // it; in the guest that takes a cgroup namespace, whose root is the container's cgroup.
    let mounts_cgroup = v["mounts"].as_array().is_some_and(|ms| {
        ms.iter()
            .any(|m| m["type"] == "cgroup" || m["type"] == "cgroup2")
    });
    let linux = &mut v["linux"];
    if let Some(nss) = linux["namespaces"].as_array_mut() {
        nss.retain(|ns| ns["type"] != "network");
        for ns in nss.iter_mut() {
            let kind = ns["type"].as_str().unwrap_or("").to_owned();
            if let Some(o) = ns.as_object_mut() {
                match (o.contains_key("path"), pod_holder) {
                    (true, Some(pid)) if POD_SHARED.contains(&kind.as_str()) => {
                        o.insert(
                            "path".into(),
                            Value::String(format!("/proc/{pid}/ns/{kind}")),
                        );
                    }
                    _ => {
                        o.remove("path");
                    }
                }
            }
        }
    } else {
        linux["namespaces"] = serde_json::json!([
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
        ]);
    }
    if mounts_cgroup {
        if let Some(nss) = linux["namespaces"].as_array_mut() {
            if !nss.iter().any(|ns| ns["type"] == "cgroup") {
                nss.push(serde_json::json!({"type": "cgroup"}));
            }
        }
    }
    linux["cgroupsPath"] = Value::String(cgroup_path(id));
    root_propagation(linux);
    if let Some(o) = linux.as_object_mut() {
        o.remove("devices");
    }

    if let Some(mounts) = v["mounts"].as_array_mut() {
        for m in mounts.iter_mut() {
            pod_shm(m, pod_holder);
        }
        mounts.retain(|m| {
            let src = m["source"].as_str().unwrap_or("");
            let keep = !is_bind(m) || exists(src);
            if !keep {
                log::warn!("container {id}: dropping bind mount of host path {src:?} (not shared with the guest)");
            }
            keep
        });
    }

    serde_json::from_value::<oci_spec::runtime::Spec>(v.clone())
        .map_err(|e| SpecError(format!("the OCI spec is not valid: {e}")))?;
    Ok(v)
}

/// `linux.rootfsPropagation` in the words libcontainer takes. runc accepts mount(8)'s
/// recursive names too (CRI writes `rshared`/`rslave` for Bidirectional/HostToContainer
/// mounts, Docker `rslave` for a bind that holds its own root); libcontainer refuses them but
/// always applies the propagation to the root recursively, so the plain name means the same.
fn root_propagation(linux: &mut Value) {
    let plain = match linux["rootfsPropagation"].as_str() {
        Some("rshared") => "shared",
        Some("rslave") => "slave",
        Some("rprivate") => "private",
        Some("runbindable") => "unbindable",
        _ => return,
    };
    linux["rootfsPropagation"] = Value::String(plain.into());
}

/// Whether a spec mount is a bind (by type, or by a `bind`/`rbind` option as `ctr` writes it).
fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// The pod's `/dev/shm`: CRI binds every container to the sandbox's shm directory on the
/// host, a tmpfs there (the shim turns that bind into a guest tmpfs of the same size). In the
/// guest, the sandbox container gets a tmpfs of its own (POSIX shared memory needs a local
/// one) and the pod's other containers bind that one, through the sandbox process's root, so
/// the pod shares it as under runc. A bind of a host path that reaches the agent directly
/// becomes a tmpfs of runc's default size.
fn pod_shm(m: &mut Value, pod_holder: Option<i32>) {
    if m["destination"] != "/dev/shm" {
        return;
    }
    if pod_holder.is_none() && !is_bind(m) {
        return;
    }
    *m = match pod_holder {
        Some(pid) => serde_json::json!({
            "destination": "/dev/shm",
            "type": "bind",
            "source": format!("/proc/{pid}/root/dev/shm"),
            "options": ["rbind", "nosuid", "nodev", "noexec"],
        }),
        None => serde_json::json!({
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "nodev", "noexec", "mode=1777", "size=65536k"],
        }),
    };
}

/// Takes the `net.*` sysctls out of an adapted spec. The container shares the guest's network
/// namespace, which is the pod's, so the runtime would refuse them there (runc does too, in
/// the host's); the agent writes them into the guest instead, as the pod's own. Keys are
/// checked: they become paths under /proc/sys.
pub fn take_net_sysctls(v: &mut Value) -> Result<Vec<(String, String)>, SpecError> {
    let Some(map) = v["linux"]["sysctl"].as_object_mut() else {
        return Ok(vec![]);
    };
    let keys: Vec<String> = map
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    let mut out = vec![];
    for k in keys {
        let ok = k.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        });
        if !ok {
            return Err(SpecError(format!("sysctl {k:?} is not a valid name")));
        }
        let value = map
            .remove(&k)
            .and_then(|x| x.as_str().map(str::to_owned))
            .unwrap_or_default();
        out.push((k, value));
    }
    Ok(out)
}

/// `/proc/sys/...` of a sysctl name (`net.ipv4.ip_forward`).
pub fn sysctl_path(key: &str) -> std::path::PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Takes the AppArmor profile out of a process object. Docker and CRI name one whenever the
/// host runs AppArmor (`docker-default`, `cri-containerd.apparmor.d`), and runc has the host's
/// kernel apply it. It is a host profile: the guest's kernel has AppArmor but no profiles, so
/// libcontainer's attempt fails the container ("failed apparmor"), and the VM around the
/// container is the boundary the profile stood for on the host. Kata's agent ignores it too.
fn drop_host_profile(process: &mut Value, id: &str) {
    if let Some(p) = process
        .as_object_mut()
        .and_then(|o| o.remove("apparmorProfile"))
    {
        log::info!("{id}: AppArmor profile {p} is the host's; not applied in the guest");
    }
}

/// Checks an exec's process object (spec.process) of container `id` before it is handed to
/// the runner, without the host's AppArmor profile.
pub fn check_process(process_json: &[u8], id: &str) -> Result<Value, SpecError> {
    let mut v: Value = serde_json::from_slice(process_json)
        .map_err(|e| SpecError(format!("the exec process is not valid JSON: {e}")))?;
    if v["args"].as_array().is_none_or(|a| a.is_empty()) {
        return Err(SpecError(
            "the exec process has no args: nothing to run".into(),
        ));
    }
    serde_json::from_value::<oci_spec::runtime::Process>(v.clone())
        .map_err(|e| SpecError(format!("the exec process is not valid: {e}")))?;
    drop_host_profile(&mut v, id);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_container_with_its_own_pid_namespace_loses_everything_with_its_init() {
        let own = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        let joined = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid", "path": "/proc/7/ns/pid"}]}});
        let none = serde_json::json!({"linux": {"namespaces": [{"type": "mount"}]}});
        assert!(!init_exit_leaves_others(&own));
        assert!(init_exit_leaves_others(&joined));
        assert!(init_exit_leaves_others(&none));
    }
    use serde_json::json;

    fn host_spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]},
            "root": {"path": "/var/lib/containerd/rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": "/run/cocoon/shared/data", "options": ["bind"]}
            ],
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts"}, {"type": "mount"}
                ],
                "cgroupsPath": "/kubepods/besteffort/pod1/abc",
                "devices": [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}],
                "resources": {"memory": {"limit": 67108864}},
                "maskedPaths": ["/proc/kcore"]
            }
        })
    }

    #[test]
    fn the_pods_shm_is_the_sandboxs_guest_tmpfs() {
        let mut spec = host_spec();
        spec["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/dev/shm", "type": "bind",
            "source": "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/s1/shm",
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]
        }));
        let raw = serde_json::to_vec(&spec).unwrap();
        let shm = |holder| {
            let v = adapt(&raw, "c1", Path::new("/r"), holder, |p| {
                p.starts_with("/proc/")
            })
            .unwrap();
            v["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == "/dev/shm")
                .cloned()
                .unwrap()
        };
        let sandbox = shm(None);
        assert_eq!(
            (&sandbox["type"], &sandbox["source"]),
            (&json!("tmpfs"), &json!("shm"))
        );
        let member = shm(Some(42));
        assert_eq!(member["source"], "/proc/42/root/dev/shm");
        assert!(!member["options"].as_array().unwrap().contains(&json!("ro")));

        // As the shim sends it: a tmpfs of the host one's size, kept for the sandbox.
        let sized = json!({
            "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid", "nodev", "noexec", "mode=1777", "size=16777216"]
        });
        let mut spec = host_spec();
        spec["mounts"].as_array_mut().unwrap().push(sized.clone());
        let raw = serde_json::to_vec(&spec).unwrap();
        let shm = |holder| {
            let v = adapt(&raw, "c1", Path::new("/r"), holder, |_| true).unwrap();
            v["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == "/dev/shm")
                .cloned()
                .unwrap()
        };
        assert_eq!(shm(None), sized);
        assert_eq!(shm(Some(42))["source"], "/proc/42/root/dev/shm");
    }

    #[test]
    fn a_container_that_mounts_cgroupfs_gets_a_cgroup_namespace_once() {
        let mut spec = host_spec();
        let ns_types = |v: &Value| -> Vec<String> {
            v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["type"].as_str().unwrap().to_owned())
                .collect()
        };
        let adapt_it = |s: &Value| {
            let raw = serde_json::to_vec(s).unwrap();
            adapt(&raw, "c1", Path::new("/r"), None, |_| true).unwrap()
        };
        assert!(!ns_types(&adapt_it(&spec)).contains(&"cgroup".to_owned()));
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}));
        let once = adapt_it(&spec);
        assert_eq!(ns_types(&once).iter().filter(|t| *t == "cgroup").count(), 1);
        // A spec that already has one (CRI on a cgroup v2 host) keeps just that one.
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "cgroup"}));
        assert_eq!(
            ns_types(&adapt_it(&spec))
                .iter()
                .filter(|t| *t == "cgroup")
                .count(),
            1
        );
    }

    #[test]
    fn host_only_pieces_are_dropped_and_limits_kept() {
        let raw = serde_json::to_vec(&host_spec()).unwrap();
        let v = adapt(
            &raw,
            "c1",
            Path::new("/run/cocoon/shared/c1/rootfs"),
            None,
            |p| p.starts_with("/run/cocoon/shared"),
        )
        .unwrap();
        assert_eq!(
            v["root"],
            json!({"path": "/run/cocoon/shared/c1/rootfs", "readonly": true})
        );
        assert!(v.get("hooks").is_none());
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        assert!(v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.get("path").is_none()));
        assert_eq!(v["linux"]["cgroupsPath"], "/cocoon/c1");
        assert!(v["linux"].get("devices").is_none());
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 67108864);
        assert_eq!(v["linux"]["maskedPaths"], json!(["/proc/kcore"]));
        let dests: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests, ["/proc", "/data"]);
    }

    #[test]
    fn a_pod_container_joins_its_sandbox_ipc_and_uts_but_not_the_host_netns() {
        let raw = serde_json::to_vec(&host_spec()).unwrap();
        let v = adapt(&raw, "c1", Path::new("/r"), Some(81), |_| true).unwrap();
        assert_eq!(
            v["linux"]["namespaces"],
            json!([
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/81/ns/ipc"},
                {"type": "uts"},
                {"type": "mount"}
            ])
        );
    }

    #[test]
    fn net_sysctls_are_taken_out_and_checked() {
        let mut v = json!({"linux": {"sysctl": {
            "net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "1024"
        }}});
        let net = take_net_sysctls(&mut v).unwrap();
        assert_eq!(
            net,
            [(
                "net.ipv4.ip_unprivileged_port_start".to_owned(),
                "0".to_owned()
            )]
        );
        assert_eq!(v["linux"]["sysctl"], json!({"kernel.shmmax": "1024"}));
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        let mut bad = json!({"linux": {"sysctl": {"net.ipv4..": "1"}}});
        assert!(take_net_sysctls(&mut bad).is_err());
        let mut bad = json!({"linux": {"sysctl": {"net./../../x": "1"}}});
        assert!(take_net_sysctls(&mut bad).is_err());
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let err = adapt(b"{not json", "c", Path::new("/r"), None, |_| true).unwrap_err();
        assert!(err.0.contains("not valid JSON"), "{err}");
        let mut s = host_spec();
        s["process"]["args"] = json!([]);
        let err = adapt(
            &serde_json::to_vec(&s).unwrap(),
            "c",
            Path::new("/r"),
            None,
            |_| true,
        )
        .unwrap_err();
        assert!(err.0.contains("process.args"), "{err}");
        let mut s = host_spec();
        s["process"]["user"] = json!({"uid": "root"});
        let err = adapt(
            &serde_json::to_vec(&s).unwrap(),
            "c",
            Path::new("/r"),
            None,
            |_| true,
        )
        .unwrap_err();
        assert!(err.0.contains("not valid"), "{err}");
    }

    #[test]
    fn exec_process_is_checked() {
        let ok = br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#;
        assert!(check_process(ok, "c/e").is_ok());
        assert!(check_process(br#"{"args":[],"cwd":"/"}"#, "c/e")
            .unwrap_err()
            .0
            .contains("no args"));
    }

    #[test]
    fn the_hosts_apparmor_profile_is_dropped_and_the_rest_of_the_process_kept() {
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "apparmorProfile": "docker-default", "noNewPrivileges": true},
            "root": {"path": "rootfs"},
        });
        let raw = serde_json::to_vec(&spec).unwrap();
        let v = adapt(&raw, "c1", Path::new("/r"), None, |_| true).unwrap();
        assert!(v["process"].get("apparmorProfile").is_none(), "{v}");
        assert_eq!(v["process"]["noNewPrivileges"], true);
        let exec = br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0},
                        "apparmorProfile":"cri-containerd.apparmor.d"}"#;
        let p = check_process(exec, "c1/e").unwrap();
        assert!(p.get("apparmorProfile").is_none(), "{p}");
        assert_eq!(p["args"], json!(["ls"]));
    }

    #[test]
    fn recursive_root_propagation_names_become_libcontainers() {
        for (given, taken) in [
            ("rshared", "shared"),
            ("rslave", "slave"),
            ("rprivate", "private"),
            ("runbindable", "unbindable"),
            ("slave", "slave"),
        ] {
            let mut linux = serde_json::json!({"rootfsPropagation": given});
            root_propagation(&mut linux);
            assert_eq!(linux["rootfsPropagation"], taken);
        }
        let mut none = serde_json::json!({});
        root_propagation(&mut none);
        assert!(none["rootfsPropagation"].is_null());
    }
}
