//! Pod-level settings from OCI annotations (`io.cocoon.*`), validated against the config's
//! limits. An annotation can size the VM but never name a binary or a host path.

use serde_json::Value;
use vmm_driver::config::MIN_MEMORY_MIB;
use vmm_driver::Config;

/// containerd CRI's annotations naming a container's pod.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Which pod (and so which shim and VM) a container belongs to: the CRI sandbox id for
/// containers of a pod, else the container's own id.
pub fn grouping_id(id: &str, spec: &serde_json::Value) -> String {
    let ann = &spec["annotations"];
    match (ann[CONTAINER_TYPE].as_str(), ann[SANDBOX_ID].as_str()) {
        (Some("container"), Some(sb)) if !sb.is_empty() => sb.to_owned(),
        _ => id.to_owned(),
    }
}

/// Whether more containers may join the pod that `spec` (its first container) starts: only a
/// CRI pod sandbox's ([`grouping_id`] puts a container in another's pod only by its id).
pub fn takes_later_containers(spec: &serde_json::Value) -> bool {
    spec["annotations"][CONTAINER_TYPE].as_str() == Some("sandbox")
}

/// The bundle's `config.json`, or null when it can't be read: `start` and `delete` only need
/// its annotations, and a missing one means "not part of a CRI pod".
pub fn bundle_spec(bundle: &std::path::Path) -> serde_json::Value {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The pod's resource totals containerd's CRI plugin puts on the sandbox container.
const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

pub const VCPUS: &str = "io.cocoon.vm.vcpus";
pub const MEMORY_MIB: &str = "io.cocoon.vm.memory_mib";
/// `"virtio-fs"` keeps a container's rootfs on the share where the config would give it layer
/// disks (a workload that needs its writes in the host's snapshot). Only that way: layer disks
/// are the operator's choice (`[rootfs] mode`), not a pod author's.
pub const ROOTFS: &str = "io.cocoon.rootfs";
/// `"always"` gives the pod its virtio-fs share from the start, where it would get it only
/// when a container needs it (a pod whose later containers bring host directories, which
/// then don't wait for the share to be plugged in).
pub const SHARE: &str = "io.cocoon.share";
const KNOWN: [&str; 4] = [VCPUS, MEMORY_MIB, ROOTFS, SHARE];

/// Whether the spec sets the opt-in annotation `key` to its one `value`; any other value is
/// refused, naming the annotation, the value it takes and `why` only that one.
fn opted_in(spec: &Value, key: &str, value: &str, why: &str) -> Result<bool, String> {
    match spec["annotations"][key].as_str() {
        None => Ok(false),
        Some(v) if v == value => Ok(true),
        Some(other) => Err(format!(
            "annotation {key}={other:?}: the only value is {value:?} ({why})"
        )),
    }
}

/// Whether the spec asks for the share from the start ([`SHARE`]).
pub fn share_always(spec: &Value) -> Result<bool, String> {
    opted_in(
        spec,
        SHARE,
        "always",
        "the share is otherwise plugged in when a container needs it",
    )
}

/// Whether the spec asks for its rootfs on the share ([`ROOTFS`]).
pub fn rootfs_on_share(spec: &Value) -> Result<bool, String> {
    opted_in(
        spec,
        ROOTFS,
        "virtio-fs",
        "layer disks are the config's choice, [rootfs] mode",
    )
}

/// Refuses `io.cocoon.*` annotations this runtime does not know, or with a value it does not
/// take: a typo must not be ignored.
pub fn check(spec: &Value) -> Result<(), String> {
    let Some(ann) = spec["annotations"].as_object() else {
        return Ok(());
    };
    rootfs_on_share(spec)?;
    share_always(spec)?;
    for k in ann.keys().filter(|k| k.starts_with("io.cocoon.")) {
        if !KNOWN.contains(&k.as_str()) {
            return Err(format!(
                "unknown annotation `{k}`: Cocoon understands {}",
                KNOWN.join(", ")
            ));
        }
    }
    Ok(())
}

/// The pod VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

fn annotation(
    spec: &Value,
    key: &str,
    min: u32,
    max: u32,
    limit_key: &str,
) -> Result<Option<u32>, String> {
    let Some(v) = spec["annotations"][key].as_str() else {
        return Ok(None);
    };
    let n: u32 = v
        .trim()
        .parse()
        .map_err(|_| format!("annotation {key}={v:?} is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("annotation {key}={n} is out of range {min}..={max} (raise {limit_key} in the cocoon config to allow more)"));
    }
    Ok(Some(n))
}

/// Sizes the VM like Kata's static sizing: the config's defaults plus the container's memory
/// limit and CPU quota when it has them (for a CRI pod: the pod's totals from the sandbox
/// annotations), capped at the config's maxima; `io.cocoon.vm.*` annotations override.
pub fn vm_size(cfg: &Config, spec: &Value) -> Result<VmSize, String> {
    let vm = &cfg.vm;
    let res = &spec["linux"]["resources"];
    let mut size = VmSize {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
    };
    if let Some(limit) = res["memory"]["limit"].as_i64().filter(|l| *l > 0) {
        let mib = u32::try_from(limit.unsigned_abs().div_ceil(1 << 20)).unwrap_or(u32::MAX);
        size.memory_mib = vm.memory_mib.saturating_add(mib).min(vm.max_memory_mib);
    }
    let quota = res["cpu"]["quota"].as_i64().unwrap_or(0);
    let period = res["cpu"]["period"].as_u64().unwrap_or(0);
    if quota > 0 && period > 0 {
        let cpus = u32::try_from(quota.unsigned_abs().div_ceil(period)).unwrap_or(u32::MAX);
        size.vcpus = vm.vcpus.saturating_add(cpus).min(vm.max_vcpus);
    }
    // A CRI pod: containerd puts the pod's totals on the sandbox (kubelet ≥ 1.23 sends them),
    // whose own container (pause) has no limits. Added to the defaults, which are the VM's
    // own overhead, as Kata does.
    let cri = |k: &str| {
        spec["annotations"][k]
            .as_str()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n > 0)
    };
    if let Some(bytes) = cri(SANDBOX_MEMORY) {
        let mib = u32::try_from(bytes.unsigned_abs().div_ceil(1 << 20)).unwrap_or(u32::MAX);
        size.memory_mib = vm.memory_mib.saturating_add(mib).min(vm.max_memory_mib);
    }
    if let (Some(q), Some(p)) = (cri(SANDBOX_CPU_QUOTA), cri(SANDBOX_CPU_PERIOD)) {
        let cpus = u32::try_from(q.unsigned_abs().div_ceil(p.unsigned_abs())).unwrap_or(u32::MAX);
        size.vcpus = vm.vcpus.saturating_add(cpus).min(vm.max_vcpus);
    }
    if !vm.annotations {
        if let Some(k) = [VCPUS, MEMORY_MIB]
            .into_iter()
            .find(|k| spec["annotations"][*k].is_string())
        {
            return Err(format!(
                "annotation {k} is not allowed: vm.annotations = false in the cocoon config (remove the annotation, or ask the operator to allow it)"
            ));
        }
    }
    if let Some(n) = annotation(spec, VCPUS, 1, vm.max_vcpus, "vm.max_vcpus")? {
        size.vcpus = n;
    }
    if let Some(n) = annotation(
        spec,
        MEMORY_MIB,
        MIN_MEMORY_MIB,
        vm.max_memory_mib,
        "vm.max_memory_mib",
    )? {
        size.memory_mib = n;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_limits_and_annotations() {
        let cfg = Config::default();
        assert_eq!(
            vm_size(&cfg, &json!({})).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let spec = json!({"linux": {"resources": {"memory": {"limit": 128 << 20}, "cpu": {"quota": 150000, "period": 100000}}}});
        assert_eq!(
            vm_size(&cfg, &spec).unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 384
            }
        );
        let spec = json!({"annotations": {VCPUS: "2", MEMORY_MIB: "512"}});
        assert_eq!(
            vm_size(&cfg, &spec).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 512
            }
        );
    }

    #[test]
    fn a_cri_pod_is_sized_from_its_totals_plus_the_overhead() {
        let cfg = Config::default();
        let spec = json!({"annotations": {
            SANDBOX_MEMORY: "268435456", SANDBOX_CPU_QUOTA: "150000", SANDBOX_CPU_PERIOD: "100000"
        }});
        assert_eq!(
            vm_size(&cfg, &spec).unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 512
            }
        );
        // Unlimited (0 or -1) adds nothing; the maxima still hold.
        let spec = json!({"annotations": {SANDBOX_MEMORY: "0", SANDBOX_CPU_QUOTA: "-1", SANDBOX_CPU_PERIOD: "100000"}});
        assert_eq!(
            vm_size(&cfg, &spec).unwrap(),
            vm_size(&cfg, &json!({})).unwrap()
        );
        let spec = json!({"annotations": {SANDBOX_MEMORY: "68719476736"}});
        assert_eq!(
            vm_size(&cfg, &spec).unwrap().memory_mib,
            cfg.vm.max_memory_mib
        );
    }

    #[test]
    fn containers_of_a_cri_pod_share_its_shim() {
        let c = json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}});
        assert_eq!(grouping_id("c1", &c), "pod1");
        let sb = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}});
        assert!(takes_later_containers(&sb) && !takes_later_containers(&c));
        assert!(!takes_later_containers(&json!({})));
        assert_eq!(grouping_id("pod1", &sb), "pod1");
        assert_eq!(grouping_id("solo", &json!({})), "solo");
    }

    #[test]
    fn bad_annotations_are_refused() {
        let cfg = Config::default();
        let e = vm_size(&cfg, &json!({"annotations": {VCPUS: "64"}})).unwrap_err();
        assert!(e.contains(VCPUS) && e.contains("vm.max_vcpus"), "{e}");
        let e = vm_size(&cfg, &json!({"annotations": {VCPUS: "5"}})).unwrap_err();
        assert!(e.contains("1..=4"), "the default ceiling is modest: {e}");
        let mut off = Config::default();
        off.vm.annotations = false;
        let e = vm_size(&off, &json!({"annotations": {MEMORY_MIB: "512"}})).unwrap_err();
        assert!(
            e.contains(MEMORY_MIB) && e.contains("vm.annotations = false"),
            "{e}"
        );
        assert!(vm_size(&off, &json!({})).is_ok());
        let e = vm_size(&cfg, &json!({"annotations": {MEMORY_MIB: "lots"}})).unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
        let e = check(&json!({"annotations": {"io.cocoon.vm.kernel": "/tmp/evil"}})).unwrap_err();
        assert!(e.contains("io.cocoon.vm.kernel"), "{e}");
        assert!(check(&json!({"annotations": {"io.kubernetes.cri.sandbox-id": "x"}})).is_ok());
    }

    #[test]
    fn a_container_can_keep_its_rootfs_on_the_share_but_not_ask_for_layers() {
        let share = json!({"annotations": {ROOTFS: "virtio-fs"}});
        assert_eq!(rootfs_on_share(&share), Ok(true));
        assert!(check(&share).is_ok());
        assert_eq!(rootfs_on_share(&json!({})), Ok(false));
        let e = check(&json!({"annotations": {ROOTFS: "layers"}})).unwrap_err();
        assert!(e.contains(ROOTFS) && e.contains("[rootfs] mode"), "{e}");
    }

    #[test]
    fn a_pod_can_ask_for_its_share_from_the_start_and_nothing_else() {
        let always = json!({"annotations": {SHARE: "always"}});
        assert_eq!(share_always(&always), Ok(true));
        assert!(check(&always).is_ok());
        assert_eq!(share_always(&json!({})), Ok(false));
        let e = check(&json!({"annotations": {SHARE: "never"}})).unwrap_err();
        assert!(e.contains(SHARE) && e.contains("always"), "{e}");
    }
}
