//! `containerd-shim-cocoon-v2 -info`: what the runtime supports, as containerd asks a shim
//! for it (`core/runtime/v2/task_manager.go` runs `<shim> -info` with the runtime's options
//! on stdin and reads a `containerd.types.RuntimeInfo` from stdout). Its `features` is the
//! OCI runtime-spec's features document (`features.md`), JSON in an `Any`; CRI reads it to
//! report a handler's features, `RecursiveReadOnlyMounts` among them ("rro" in
//! `mountOptions`), which critest and kubelet check before they use them.
//!
//! The lists say what a container in the guest gets: libcontainer's mount options (it applies
//! the recursive ones with `mount_setattr`), the hooks the shim runs (`hooks.rs`), the
//! namespaces a pod VM gives (no host network or IPC, no user namespaces), seccomp. What is
//! left out is reported as unsupported rather than guessed.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use serde_json::{json, Value};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.cocoon.v2";

/// The type containerd registers for the runtime-spec features document.
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Mount options a container's mounts may carry: libcontainer 0.7's (`syscall/linux.rs`),
/// recursive ones included.
const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rprivate",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rw",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
    "runbindable",
    "rro",
    "rrw",
    "rnosuid",
    "rsuid",
    "rnodev",
    "rdev",
    "rnoexec",
    "rexec",
    "rnodiratime",
    "rdiratime",
    "rrelatime",
    "rnorelatime",
    "rnoatime",
    "ratime",
    "rstrictatime",
    "rnostrictatime",
    "rnosymfollow",
    "rsymfollow",
];

/// The features document.
pub fn features() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            // A pod VM's own; the host's network and IPC are refused (host_ns.rs).
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}},
        },
        "annotations": {"io.github.cocoon.runtime": RUNTIME_NAME},
    })
}

/// The `RuntimeInfo` message `-info` writes, serialized.
pub fn runtime_info() -> Vec<u8> {
    let mut info = RuntimeInfo::new();
    info.name = RUNTIME_NAME.to_owned();
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_owned();
    info.version = MessageField::some(version);
    let mut any = Any::new();
    any.type_url = FEATURES_TYPE_URL.to_owned();
    any.value = features().to_string().into_bytes();
    info.features = MessageField::some(any);
    // Serializing a message with only strings and bytes can't fail.
    info.write_to_bytes().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_info_decodes_as_containerd_reads_it_and_claims_recursive_read_only() {
        let info = RuntimeInfo::parse_from_bytes(&runtime_info()).unwrap();
        assert_eq!(info.name, "io.containerd.cocoon.v2");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let f: Value = serde_json::from_slice(&info.features.value).unwrap();
        let opts: Vec<&str> = f["mountOptions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(opts.contains(&"rro") && opts.contains(&"rbind"), "{opts:?}");
        let ns = f["linux"]["namespaces"].as_array().unwrap();
        assert!(!ns.iter().any(|n| n == "user"), "no user namespaces yet");
        assert_eq!(f["linux"]["mountExtensions"]["idmap"]["enabled"], false);
    }
}
