//! Shared helpers for the integration tests: configs pointing at the installed guest image,
//! a lock so VM tests don't compete for the two cores, leak checks, and a pod VM with a
//! busybox rootfs for container tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

pub mod containerd;

use std::path::{Path, PathBuf};

use vmm_driver::config::Hypervisor;
use vmm_driver::Config;

/// VM tests take turns: concurrent TCG guests on a 2-core machine distort each other's timings.
pub static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where `make image` installed the guest image (override with COCOON_IMAGE_DIR).
pub fn image_dir() -> PathBuf {
    std::env::var_os("COCOON_IMAGE_DIR").map_or_else(
        || PathBuf::from(vmm_driver::config::DEFAULT_IMAGE_DIR),
        PathBuf::from,
    )
}

/// The default config, with the installed image and runtime state in `state`.
pub fn test_config(state: &Path) -> Config {
    let img = image_dir();
    let cfg = Config {
        kernel: img.join("vmlinuz"),
        initramfs: img.join("initramfs.img"),
        state_dir: state.to_owned(),
        ..Config::default()
    };
    for p in [&cfg.kernel, &cfg.initramfs] {
        assert!(
            p.is_file(),
            "{} is missing: run `make image` first",
            p.display()
        );
    }
    cfg
}

/// The hypervisor the shim-level tests (containers.rs, ctr.rs) run with:
/// `COCOON_TEST_HYPERVISOR=qemu` (the default) or `cloud-hypervisor`.
pub fn test_hypervisor() -> Hypervisor {
    match std::env::var("COCOON_TEST_HYPERVISOR").as_deref() {
        Err(_) | Ok("" | "qemu") => Hypervisor::Qemu,
        Ok("cloud-hypervisor") => Hypervisor::CloudHypervisor,
        Ok(other) => panic!("COCOON_TEST_HYPERVISOR={other}: use qemu or cloud-hypervisor"),
    }
}

/// [`test_config`] with the hypervisor chosen by [`test_hypervisor`].
pub fn backend_config(state: &Path) -> Config {
    Config {
        hypervisor: test_hypervisor(),
        ..test_config(state)
    }
}

/// Why `hv` can't boot a guest on this host, or None when it can. QEMU always can (TCG).
pub fn unavailable(hv: Hypervisor) -> Option<String> {
    match hv {
        Hypervisor::Qemu => None,
        Hypervisor::CloudHypervisor => {
            let cfg = Config {
                hypervisor: hv,
                ..Config::default()
            };
            if let Err(e) = vmm_driver::cloud_hypervisor::check_host(
                &cfg,
                &vmm_driver::accel::HostFacts::probe(),
            ) {
                return Some(e.to_string());
            }
            ch_binary_missing()
        }
    }
}

/// Why there is no `cloud-hypervisor` to run here, or None when one is on PATH.
pub fn ch_binary_missing() -> Option<String> {
    which::which(vmm_driver::config::BinaryPaths::default().cloud_hypervisor)
        .is_err()
        .then(|| "cloud-hypervisor is not on PATH (it has no Debian package; build it from its source and put it on PATH)".into())
}

/// Takes this test's turn on the VM lock, or, where the selected hypervisor can't boot a guest
/// here, prints why and returns None so the test can end as skipped.
pub async fn vm_turn(test: &str) -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if let Some(why) = unavailable(test_hypervisor()) {
        println!("SKIPPED {test} with {:?}: {why}", test_hypervisor());
        return None;
    }
    Some(VM_LOCK.lock().await)
}

/// Processes whose command line mentions `needle` (a per-test temp dir): anything listed after
/// a VM stopped is a leak.
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(&needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Everything left under `dir`, recursively: after a stop there must be nothing.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Asserts that nothing of a VM under `state` survives: no process, no file, no directory.
pub fn assert_no_leaks(state: &Path) {
    let procs = processes_mentioning(state);
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");
    let files = leftovers(state);
    assert!(files.is_empty(), "files left behind: {files:#?}");
}

// ---------------------------------------------------------------------------------------------
// Containers in a real guest.

use cocoon_protocol::agent::StdioStreams;
use cocoon_shim::sandbox::{Sandbox, StdioKind};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use vmm_driver::vsock::BoxedStream;

/// The host's busybox-static (Debian package busybox-static, installed by `make setup`).
pub fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("busybox-static is missing: run `make setup`"))
}

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
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
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

/// A booted pod VM for container tests; holds the VM lock for its lifetime.
#[derive(Debug)]
pub struct Pod {
    pub sb: Sandbox,
    pub state: tempfile::TempDir,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// The host ends of one process's stdio.
#[derive(Debug, Default)]
pub struct Io {
    pub stdin: Option<BoxedStream>,
    pub stdout: Option<JoinHandle<Vec<u8>>>,
    pub stderr: Option<JoinHandle<Vec<u8>>>,
}

fn drain(mut s: BoxedStream) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    })
}

impl Io {
    pub async fn output(&mut self) -> (Vec<u8>, Vec<u8>) {
        let out = match self.stdout.take() {
            Some(h) => h.await.unwrap(),
            None => vec![],
        };
        let err = match self.stderr.take() {
            Some(h) => h.await.unwrap(),
            None => vec![],
        };
        (out, err)
    }
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(std::time::Duration::from_secs(30))
}

impl Pod {
    /// Boots a pod VM with the selected hypervisor; None (skip printed) where it can't run.
    pub async fn boot(name: &str) -> Option<Pod> {
        let serial = vm_turn(name).await?;
        let state = tempfile::tempdir().unwrap();
        let cfg = backend_config(state.path());
        let sb = Sandbox::boot(&cfg, &vmm_driver::VmSpec::from_config(&cfg, name))
            .await
            .unwrap();
        Some(Pod {
            sb,
            state,
            _serial: serial,
        })
    }

    /// Lays out a busybox rootfs for `cid` on the share; returns its share-relative path.
    pub fn rootfs(&self, cid: &str) -> String {
        busybox_rootfs(&self.sb.shared_dir().join(cid).join("rootfs"));
        format!("{cid}/rootfs")
    }

    /// Opens the streams `stdio` asks for, before the call that claims them.
    pub async fn io(&self, cid: &str, eid: &str, stdio: &StdioStreams) -> Io {
        let mut io = Io::default();
        if stdio.stdin {
            io.stdin = Some(
                self.sb
                    .open_stdio(cid, eid, StdioKind::Stdin)
                    .await
                    .unwrap(),
            );
        }
        if stdio.stdout {
            io.stdout = Some(drain(
                self.sb
                    .open_stdio(cid, eid, StdioKind::Stdout)
                    .await
                    .unwrap(),
            ));
        }
        if stdio.stderr && !stdio.terminal {
            io.stderr = Some(drain(
                self.sb
                    .open_stdio(cid, eid, StdioKind::Stderr)
                    .await
                    .unwrap(),
            ));
        }
        io
    }

    /// Stops the VM after removing the test's rootfs dirs, then checks nothing is left.
    pub async fn shutdown(self) {
        if let Ok(entries) = std::fs::read_dir(self.sb.shared_dir()) {
            for e in entries.flatten() {
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
        self.sb.shutdown().await.unwrap();
        assert_no_leaks(self.state.path());
    }
}

pub fn streams(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> StdioStreams {
    StdioStreams {
        stdin,
        stdout,
        stderr,
        terminal,
        ..Default::default()
    }
}
