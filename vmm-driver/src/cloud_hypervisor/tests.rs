//! Request bodies against Cloud Hypervisor's published schema (the subset in `ch-api-v54.json`,
//! written from its `cloud-hypervisor.yaml`), the host check, and the `vm.create` body.

use serde_json::Value;

use super::api::*;
use super::*;
use crate::accel::HostFacts;

const API: &str = include_str!("ch-api-v54.json");
const VM_INFO: &str = include_str!("vm-info-v54.json");

fn schemas() -> Value {
    serde_json::from_str::<Value>(API).unwrap()["schemas"].clone()
}

/// Checks `v` against schema `name`: every field is a known property of the right JSON type,
/// every required field is there, enums hold a listed value. Nested schemas are followed.
pub(super) fn conforms(name: &str, v: &Value) -> Result<(), String> {
    let all = schemas();
    let schema = all
        .get(name)
        .ok_or_else(|| format!("schema {name} is not in the fixture"))?;
    if let Some(values) = schema.get("enum") {
        return match values.as_array().unwrap().contains(v) {
            true => Ok(()),
            false => Err(format!("{name}: {v} is not one of {values}")),
        };
    }
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{name}: expected an object, got {v}"))?;
    for req in schema["required"].as_array().unwrap() {
        let req = req.as_str().unwrap();
        if !obj.contains_key(req) {
            return Err(format!("{name}: required field `{req}` is missing in {v}"));
        }
    }
    for (field, value) in obj {
        let ty = schema["properties"]
            .get(field)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{name}: `{field}` is not in Cloud Hypervisor's schema"))?;
        check_type(&format!("{name}.{field}"), ty, value)?;
    }
    Ok(())
}

fn check_type(at: &str, ty: &str, v: &Value) -> Result<(), String> {
    if let Some(inner) = ty.strip_prefix("array<").and_then(|t| t.strip_suffix('>')) {
        let items = v
            .as_array()
            .ok_or_else(|| format!("{at}: expected an array, got {v}"))?;
        return items.iter().try_for_each(|i| check_type(at, inner, i));
    }
    if let Some(schema) = ty.strip_prefix('#') {
        return conforms(schema, v).map_err(|e| format!("{at}: {e}"));
    }
    let ok = match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        other => return Err(format!("{at}: fixture type `{other}` is unknown")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{at}: expected {ty}, got {v}"))
    }
}

fn test_vm(dir: &std::path::Path) -> (ChVm, Config, VmSpec) {
    let cfg = Config {
        state_dir: dir.to_owned(),
        kernel_params: "extra=1".into(),
        ..Config::default()
    };
    let spec = VmSpec::from_config(&cfg, "pod1");
    let rd = RunDir::create(&spec.run_dir).unwrap();
    let vm = ChVm {
        endpoint: VsockEndpoint {
            transport: VsockTransport::Hybrid(rd.path("vsock.sock")),
            key: None,
        },
        api: ApiClient::new(&rd.path("ch-api.sock"), std::time::Duration::from_secs(10)),
        dir: rd,
        vmm: None,
        virtiofsd: None,
        supervisor: None,
        console: None,
    };
    (vm, cfg, spec)
}

#[test]
fn vm_create_body_matches_the_schema_and_the_sandbox() {
    let t = tempfile::tempdir().unwrap();
    let (vm, cfg, spec) = test_vm(t.path());
    let body = vm.vm_config(&cfg, &spec);
    let json = serde_json::to_value(&body).unwrap();
    conforms("VmConfig", &json).unwrap();

    let run = t.path().join("pod1");
    assert_eq!(json["memory"]["size"], 256 * MIB);
    assert_eq!(
        json["memory"]["shared"], true,
        "virtio-fs needs shared memory"
    );
    // Hotplug room and vCPU ceiling come from the config's maxima (defaults 4096 MiB, 4).
    assert_eq!(
        json["memory"]["hotplug_size"],
        u64::from(cfg.vm.max_memory_mib - 256) * MIB
    );
    assert_eq!(
        json["cpus"],
        serde_json::json!({"boot_vcpus": 1, "max_vcpus": cfg.vm.max_vcpus})
    );
    assert_eq!(json["vsock"]["cid"], 3);
    assert_eq!(
        json["vsock"]["socket"],
        run.join("vsock.sock").to_str().unwrap()
    );
    assert_eq!(json["fs"][0]["tag"], VIRTIOFS_TAG);
    assert_eq!(
        json["fs"][0]["socket"],
        run.join("virtiofsd.sock").to_str().unwrap()
    );
    // A socket the driver reads with its cap, never a file CH grows without bound.
    assert_eq!(json["serial"]["mode"], "Socket");
    assert_eq!(
        json["serial"]["socket"],
        run.join("console.sock").to_str().unwrap()
    );
    assert!(json["serial"].get("file").is_none());
    assert_eq!(json["console"]["mode"], "Off");
    assert_eq!(json["rng"]["src"], "/dev/urandom");
    assert_eq!(json["payload"]["kernel"], cfg.kernel.to_str().unwrap());
    assert_eq!(
        json["payload"]["initramfs"],
        cfg.initramfs.to_str().unwrap()
    );
    assert_eq!(json["payload"]["cmdline"], kernel_cmdline(&cfg, &spec));
    assert!(kernel_cmdline(&cfg, &spec).ends_with("extra=1"));
    vm.dir.remove().unwrap();
}

#[test]
fn memory_at_the_maximum_has_no_hotplug_room() {
    let t = tempfile::tempdir().unwrap();
    let (vm, cfg, mut spec) = test_vm(t.path());
    spec.memory_mib = cfg.vm.max_memory_mib;
    assert_eq!(vm.vm_config(&cfg, &spec).memory.unwrap().hotplug_size, None);
    vm.dir.remove().unwrap();
}

#[test]
fn every_other_request_body_matches_the_schema() {
    let bodies = [
        (
            "VmResize",
            serde_json::to_value(VmResize {
                desired_vcpus: Some(2),
                desired_ram: Some(512 * MIB),
                desired_balloon: Some(0),
            }),
        ),
        (
            "NetConfig",
            serde_json::to_value(NetConfig {
                tap: Some("tap0".into()),
                mac: Some("52:54:00:12:34:56".into()),
                mtu: Some(1500),
                id: Some("net0".into()),
            }),
        ),
        (
            "DiskConfig",
            serde_json::to_value(DiskConfig {
                path: "/d.img".into(),
                readonly: true,
                id: Some("d0".into()),
            }),
        ),
        (
            "FsConfig",
            serde_json::to_value(FsConfig {
                id: Some("fs1".into()),
                ..FsConfig::new("t", "/s".into())
            }),
        ),
    ];
    for (schema, body) in bodies {
        conforms(schema, &body.unwrap()).unwrap();
    }
    // The checker itself must catch what CH would reject or misread.
    let e = conforms("FsConfig", &serde_json::json!({"tag": "t", "socket": "/s"})).unwrap_err();
    assert!(e.contains("num_queues"), "{e}");
    let e = conforms("VmResize", &serde_json::json!({"desired_cpus": 2})).unwrap_err();
    assert!(e.contains("desired_cpus"), "{e}");
    let e = conforms("DiskConfig", &serde_json::json!({"readonly": "yes"})).unwrap_err();
    assert!(e.contains("boolean"), "{e}");
    let e = conforms("SerialConfig", &serde_json::json!({"mode": "Fil"})).unwrap_err();
    assert!(e.contains("Fil"), "{e}");
}

#[test]
fn a_real_vm_info_reply_parses() {
    let v: Value = serde_json::from_str(VM_INFO).unwrap();
    conforms("VmState", &v["state"]).unwrap();
    let info: VmInfo = serde_json::from_value(v).unwrap();
    assert_eq!(info.state, VmState::Created);
    let mem = info.config.memory.unwrap();
    assert!(mem.shared && mem.size == 256 * MIB);
    assert_eq!(info.config.vsock.unwrap().cid, 3);
    assert_eq!(info.config.fs.unwrap()[0].tag, "cocoon");
    // Our own type reads back what CH echoed, so nothing we send is silently dropped.
    let ping: VmmPingResponse = serde_json::from_str(
        r#"{"build_version":"v53.0-246-gae44c2971-dirty","version":"54.0.0","pid":1,"features":["kvm"]}"#,
    )
    .unwrap();
    conforms("VmmPingResponse", &serde_json::to_value(ping).unwrap()).unwrap();
}

fn host(dev_kvm: bool, intel: bool) -> HostFacts {
    HostFacts {
        dev_kvm,
        kvm_intel: intel,
        ..HostFacts::default()
    }
}

#[test]
fn without_real_kvm_it_says_to_use_qemu() {
    let cfg = Config::default();
    assert!(check_host(&cfg, &host(true, true)).is_ok());
    for h in [host(false, false), host(true, false)] {
        let e = check_host(&cfg, &h).unwrap_err().to_string();
        assert!(
            e.contains("cloud-hypervisor")
                && e.contains("KVM")
                && e.contains("hypervisor = \"qemu\""),
            "{e}"
        );
    }
    let tcg = Config {
        accel: Accel::Tcg,
        ..Config::default()
    };
    let e = check_host(&tcg, &host(true, true)).unwrap_err().to_string();
    assert!(
        e.contains("accel = \"tcg\"") && e.contains("hypervisor = \"qemu\""),
        "{e}"
    );
    let kernel_vsock = Config {
        vsock: VsockMode::Kernel,
        ..Config::default()
    };
    let e = check_host(&kernel_vsock, &host(true, true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vsock") && e.contains("hybrid"), "{e}");
}
