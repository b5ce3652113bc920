//! What a test container is made of: a busybox-static root filesystem and the OCI spec
//! `runc spec` writes, the shape containerd hands a runtime.

use std::path::Path;

use serde_json::{json, Value};

use crate::paths::busybox;

/// A minimal OCI image root: busybox-static with every applet linked into /bin.
pub fn busybox_rootfs(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox(), bin.join("busybox")).unwrap();
    let list = std::process::Command::new(busybox())
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| *a != "busybox")
    {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
    euid_probe(&bin.join("euid"));
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    // A hostile image's trap for mount destinations: a path through it climbs to "/" (of
    // whatever resolves it). A runtime must resolve it inside the container's root.
    // (Already there when a test builds a second rootfs in the same directory.)
    let escape = root.join("escape");
    if std::fs::symlink_metadata(&escape).is_err() {
        std::os::unix::fs::symlink("../../../../../../..", &escape).unwrap();
    }
}

/// `/bin/euid`: prints its effective uid, setuid root (mode 4755). busybox drops a setuid
/// bit itself for nearly every applet, so whether the kernel honoured one (a `nosuid` mount,
/// `no_new_privs`) needs a program of its own: a static C one-liner, built here with the
/// system's C compiler (which Rust's linker needs anyway).
fn euid_probe(out: &Path) {
    static_c(
        out,
        "#include <stdio.h>\n#include <unistd.h>\n\
         int main(void) { printf(\"%d\\n\", (int)geteuid()); return 0; }\n",
        0o4755,
    );
}

/// Compiles the C program `source` into a static binary at `out` with mode `mode`: for the
/// few test programs busybox has no applet for.
pub fn static_c(out: &Path, source: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("prog.c");
    std::fs::write(&src, source).unwrap();
    let built = std::process::Command::new("cc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(out)
        .arg(&src)
        .output()
        .expect("cc is missing: run `make setup`");
    assert!(
        built.status.success(),
        "cc {}: {}",
        out.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The spec `runc spec` writes, with `args` to run: the shape containerd hands a runtime.
pub fn oci_spec(args: &[&str], terminal: bool) -> Value {
    let caps = json!([
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_CHOWN",
        "CAP_SETUID",
        "CAP_SETGID"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "cocoon-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
