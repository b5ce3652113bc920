//! Unit tests of `template.rs`: which template a launch names, and when a saved one is used.

use super::*;
use crate::accel::Chosen;
use crate::qemu::cmdline::VsockDevice;

fn launch(dir: &Path) -> QemuLaunch {
    QemuLaunch {
        name: "cocoon-a".into(),
        version: crate::qemu::version::QemuVersion::new(7, 2),
        accel: Chosen::Tcg,
        vcpus: 1,
        memory_mib: 256,
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        cmdline: "console=ttyS0 cocoon.template=1".into(),
        console_socket: dir.join("a/console.sock"),
        qmp_socket: dir.join("a/qmp.sock"),
        vsock: VsockDevice::VhostUser(dir.join("a/vhost.sock")),
        virtiofs_socket: Some(dir.join("a/fs.sock")),
        virtiofs_tag: "cocoon".into(),
        nics: vec![],
        hotplug_slots: NIC_PORTS,
        run_as: Some((1, 1)),
        template: Some(TemplateRole::Build),
        ram_file: None,
        ram_private: false,
        agent_key: Some("/run/x/agent-key".into()),
    }
}

/// A kernel, initramfs and QEMU binary in a temp dir; returns the dir and the QEMU path.
fn inputs() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    for f in ["vmlinuz", "initramfs.img", "qemu"] {
        std::fs::write(d.path().join(f), f).unwrap();
    }
    let qemu = d.path().join("qemu");
    (d, qemu)
}

#[test]
fn the_template_follows_the_machine_and_its_files_not_the_pod() {
    let (d, qemu) = inputs();
    let l = launch(d.path());
    let base = identity(d.path(), &qemu, &l).dir;

    // Another pod's sockets, name and uid: the same template.
    let mut other_pod = l.clone();
    other_pod.name = "cocoon-b".into();
    other_pod.console_socket = d.path().join("b/console.sock");
    other_pod.qmp_socket = d.path().join("b/qmp.sock");
    other_pod.virtiofs_socket = Some(d.path().join("b/fs.sock"));
    other_pod.run_as = Some((2, 2));
    assert_eq!(identity(d.path(), &qemu, &other_pod).dir, base);

    // Another shape or kernel command line: another template.
    let mut bigger = l.clone();
    bigger.memory_mib = 512;
    assert_ne!(identity(d.path(), &qemu, &bigger).dir, base);
    let mut params = l.clone();
    params.cmdline.push_str(" x=1");
    assert_ne!(identity(d.path(), &qemu, &params).dir, base);

    // A kernel replaced on disk (`make image`): another template.
    std::fs::write(d.path().join("vmlinuz"), "a new kernel").unwrap();
    assert_ne!(identity(d.path(), &qemu, &l).dir, base);
}

#[test]
fn a_saved_template_is_used_only_whole_and_from_the_same_inputs() {
    let (d, qemu) = inputs();
    let id = identity(&d.path().join("t"), &qemu, &launch(d.path()));
    assert!(id.problem().unwrap().contains("no "), "nothing saved yet");
    std::fs::create_dir_all(&id.dir).unwrap();
    std::fs::write(id.state(), vec![7u8; 100]).unwrap();
    std::fs::write(id.ram(), vec![0u8; 4096]).unwrap();
    let meta = |key: &str, bytes: u64| Meta {
        key: key.into(),
        inputs: id.inputs.clone(),
        state_bytes: bytes,
        ram_bytes: 4096,
        build_ms: 1,
        built_unix: 1,
    };
    let write =
        |m: Meta| std::fs::write(id.meta_path(), serde_json::to_string(&m).unwrap()).unwrap();
    write(meta(&id.key, 100));
    assert_eq!(id.problem(), None);
    write(meta("format 0", 100));
    assert!(id.problem().unwrap().contains("other inputs"));
    write(meta(&id.key, 200));
    assert!(id.problem().unwrap().contains("200 were saved"));
    // Its RAM must be whole too.
    write(meta(&id.key, 100));
    std::fs::write(id.ram(), vec![0u8; 100]).unwrap();
    assert!(id.problem().unwrap().contains("its RAM is 100 bytes"));
    std::fs::remove_file(id.ram()).unwrap();
    assert!(id.problem().unwrap().contains("no RAM"));
    std::fs::write(id.ram(), vec![0u8; 4096]).unwrap();

    // A restore QEMU refused throws away only the state it read, not a newer one.
    let refused = std::fs::File::open(id.state()).unwrap();
    std::fs::remove_file(id.state()).unwrap();
    std::fs::write(id.state(), vec![7u8; 100]).unwrap();
    id.discard_refused(&refused);
    assert!(
        id.state().exists(),
        "a template made meanwhile was thrown away"
    );
    let refused = std::fs::File::open(id.state()).unwrap();
    id.discard_refused(&refused);
    assert!(!id.dir.exists());
    std::fs::create_dir_all(&id.dir).unwrap();
    std::fs::write(id.state(), vec![7u8; 100]).unwrap();

    // One of another template format, from the same files: removed too; this one stays.
    let older = d.path().join("t/older");
    std::fs::create_dir_all(&older).unwrap();
    let mut m = serde_json::to_value(meta("format 2\nthe rest", 100)).unwrap();
    m.as_object_mut().unwrap().remove("ram_bytes");
    std::fs::write(older.join("meta.json"), m.to_string()).unwrap();
    write(meta(&id.key, 100));
    prune_stale(&d.path().join("t"), &d.path().join("t/other"));
    assert!(!older.exists(), "a template of another format was kept");
    assert!(id.dir.exists(), "a usable template was removed");

    // Its kernel changes on disk: removed when another template is made beside it.
    write(meta(&id.key, 100));
    std::fs::write(d.path().join("vmlinuz"), "a new kernel").unwrap();
    prune_stale(&d.path().join("t"), &d.path().join("t/other"));
    assert!(!id.dir.exists());
}
