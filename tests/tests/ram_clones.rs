//! Pods that share the VM template's RAM (issue #30 item 2): a lean pod on the serial channel
//! maps the template's RAM file copy-on-write from a file its QEMU opened read-only. Two
//! clones of one template are still two machines (their own randomness, clock, memory and
//! files), the template's RAM file is unchanged after both wrote their memory, and a later
//! container that binds a host directory into a clone gets an error that says why and what to
//! change. Real containerd, real VMs, QEMU 8.2 or later (Cocoon's own, from `make setup`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use cocoon_tests::containerd::{bind_mount, Containerd, IMAGE, RUNTIME};
use cocoon_tests::leaks::pids_named;
use cocoon_tests::{gate, Need};
use sha2::{Digest, Sha256};
use vmm_driver::config::TemplateMode;
use vmm_driver::qemu::version::QemuVersion;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(c: &Containerd, id: &str, exec_id: &str, script: &str) -> String {
    let out = c.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
    assert!(out.status.success(), "{script}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Why this host can't run clones, if it can't.
fn cannot_clone() -> Option<String> {
    if cocoon_tests::config::test_template() == TemplateMode::Off {
        return Some("COCOON_TEST_TEMPLATE=off: no template to clone".into());
    }
    let qemu = vmm_driver::config::default_qemu();
    let out = std::process::Command::new(&qemu)
        .arg("-version")
        .output()
        .ok()?;
    let v = QemuVersion::parse(&text(&out.stdout))?;
    (!v.maps_read_only_ram_private()).then(|| {
        format!(
            "{} is QEMU {v}: clones need 8.2 or later (`make setup` installs Cocoon's own)",
            qemu.display()
        )
    })
}

/// The RAM file pod QEMU `pid` maps, from its command line; asserts it is a private,
/// read-only mapping.
fn mapped_ram(pid: i32) -> PathBuf {
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .replace('\0', " ");
    let backend = cmdline
        .split_whitespace()
        .find(|a| a.starts_with("memory-backend-"))
        .unwrap()
        .to_owned();
    assert!(
        backend.starts_with("memory-backend-file")
            && backend.contains("share=off,readonly=on,rom=off"),
        "a lean pod's RAM is the template's, copy-on-write: {backend}"
    );
    let path = backend
        .split(',')
        .find_map(|kv| kv.strip_prefix("mem-path="))
        .unwrap();
    PathBuf::from(path)
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

#[tokio::test]
async fn two_clones_of_one_template_are_two_machines_and_leave_the_template_alone() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    if let Some(why) = cannot_clone() {
        eprintln!("skipped: {why}");
        return;
    }
    // The only test of this binary that needs it: the channel without vhost-user.
    std::env::set_var("COCOON_TEST_VSOCK", "serial");
    let c = Containerd::start();
    c.import_test_image();
    c.run_detached("clone-a", &["sleep", "600"]);
    let a_qemu = pids_named(&c.cocoon_state, "qemu-system-x86_64");
    assert_eq!(a_qemu.len(), 1);
    let ram = mapped_ram(a_qemu[0]);
    let meta = std::fs::metadata(&ram).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o400),
        "{}: root's, and read-only",
        ram.display()
    );
    let before = sha(&ram);
    c.run_detached("clone-b", &["sleep", "600"]);
    let both = pids_named(&c.cocoon_state, "qemu-system-x86_64");
    assert_eq!(both.len(), 2);
    for pid in &both {
        assert_eq!(mapped_ram(*pid), ram, "both clones map one template");
    }

    // Each clone writes 32 MiB of its RAM (a guest tmpfs) and a marker, and reads randomness.
    let run = |id: &str| {
        let script = format!(
            "head -c 33554432 /dev/urandom > /dev/shm/fill && echo {id} > /dev/shm/marker && \
             od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; \
             cat /proc/sys/kernel/random/uuid; date +%s"
        );
        sh(&c, id, "probe", &script)
    };
    let (a, b) = (run("clone-a"), run("clone-b"));
    let lines = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
    let (a, b) = (lines(&a), lines(&b));
    assert_eq!(a.len(), 3, "{a:?}");
    assert_ne!(a[0], b[0], "each clone has its own randomness");
    assert_ne!(a[1], b[1], "each clone makes its own UUIDs");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for clock in [&a[2], &b[2]] {
        let t: i64 = clock.parse().unwrap();
        assert!(
            (now - t).abs() < 5,
            "a clone's clock is the host's: {t} vs {now}"
        );
    }
    // Neither sees the other's files or memory: each has its own marker only.
    assert_eq!(sh(&c, "clone-a", "m", "cat /dev/shm/marker"), "clone-a\n");
    assert_eq!(sh(&c, "clone-b", "m", "cat /dev/shm/marker"), "clone-b\n");

    // The clones' writes stayed theirs: the template's RAM is as it was.
    assert_eq!(
        sha(&ram),
        before,
        "{} changed under its clones",
        ram.display()
    );

    // A container that joins clone-a's pod with a host directory can't have it.
    let share = tempfile::tempdir().unwrap();
    let mount = bind_mount(share.path(), "/data", "rbind:ro");
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=clone-a",
        "--mount",
        &mount,
        IMAGE,
        "joiner",
        "sleep",
        "600",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a host directory in a clone: {err}");
    assert!(
        err.contains("copy-on-write") && err.contains("io.cocoon.share=always"),
        "the error says why and what to change: {err}"
    );
    let _ = c.ctr(&["containers", "rm", "joiner"]);
    // The clone runs on.
    assert_eq!(sh(&c, "clone-a", "after", "echo alive"), "alive\n");

    // The 32 MiB each clone freed were not reported to a QEMU that can't discard them (the
    // guest reports after ~2 s; each failed discard is a line in QEMU's log).
    let _ = sh(&c, "clone-a", "free", "rm /dev/shm/fill");
    std::thread::sleep(std::time::Duration::from_secs(4));
    for id in ["clone-a", "clone-b"] {
        let log = std::fs::read_to_string(c.cocoon_state.join(id).join("qemu.log")).unwrap();
        assert!(
            !log.contains("ram_block_discard_range"),
            "{id}: the guest reported free pages its QEMU can't discard:\n{log}"
        );
    }
    for id in ["clone-a", "clone-b"] {
        c.kill_and_remove(id);
    }
    c.assert_clean();
    assert_eq!(sha(&ram), before);
}
