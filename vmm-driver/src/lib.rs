//! Starts, reaches and stops the VM of one pod.
//!
//! Nothing here knows about containers: a VM is a kernel, an initramfs, a shared directory and
//! a vsock endpoint where the guest agent will answer.

pub mod accel;
pub mod cloud_hypervisor;
pub mod config;
mod daemon;
pub mod error;
pub mod qemu;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

pub use config::Config;
pub use daemon::tail_lines;
pub use error::{Error, Result};
use vsock::{connect_once, Backoff, BoxedStream, VsockEndpoint};

/// What one VM should be; the backend decides how.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Sandbox id; names the VM in logs and process titles.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Per-VM directory for sockets, logs and the shared dir. Created by launch, removed by stop.
    pub run_dir: PathBuf,
    /// Appended to the kernel command line after the config's own.
    pub kernel_params: Vec<String>,
}

impl VmSpec {
    /// A VM sized by the config's defaults, living in `<state_dir>/<id>`.
    pub fn from_config(cfg: &Config, id: &str) -> VmSpec {
        VmSpec {
            id: id.to_owned(),
            vcpus: cfg.vm.vcpus,
            memory_mib: cfg.vm.memory_mib,
            run_dir: cfg.state_dir.join(id),
            kernel_params: vec![],
        }
    }
}

/// A running VM. Backends differ in how they start and stop; callers see only this.
#[async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Where the guest's vsock ports are reached.
    fn agent_endpoint(&self) -> &vsock::VsockEndpoint;
    /// The guest serial console, for error messages and debugging.
    fn console_log(&self) -> PathBuf;
    /// Every host process this VM owns, by name.
    fn pids(&self) -> Vec<(&'static str, u32)>;
    /// Why the VMM is gone, if it exited on its own (guest poweroff, crash, kill).
    fn exit_error(&mut self) -> Option<Error>;
    /// Waits up to `timeout` for the VMM to exit on its own; true if it did.
    async fn wait_exit(&mut self, timeout: Duration) -> bool;
    /// Stops the VMM and every helper, reaps them all and removes the run directory.
    /// Safe to call more than once and after a failed start.
    async fn stop(&mut self) -> Result<()>;
}

/// Boots a VM with the configured hypervisor.
pub async fn launch(cfg: &Config, spec: &VmSpec) -> Result<Box<dyn Vmm>> {
    match cfg.hypervisor {
        config::Hypervisor::Qemu => Ok(Box::new(qemu::QemuVm::launch(cfg, spec).await?)),
        config::Hypervisor::CloudHypervisor => {
            Ok(Box::new(cloud_hypervisor::ChVm::launch(cfg, spec).await?))
        }
    }
}

/// How long a helper daemon (or CH's API server) may take to create its socket.
pub(crate) const DAEMON_READY: Duration = Duration::from_secs(10);
/// Grace for a process asked to exit before it is killed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);
/// The virtio-fs tag the agent mounts.
pub const VIRTIOFS_TAG: &str = "cocoon";

/// The guest kernel command line: Cocoon's own, then the pod's, then the config's extras.
/// Each of Cocoon's boot-time parameters was measured (guest uptime at agent ready, TCG,
/// alternating boots; docs/performance.md):
/// - `quiet`: every console byte is emulated under TCG.
/// - `cryptomgr.notests`: the kernel otherwise self-tests every crypto algorithm it registers
///   (~250 ms under TCG); the algorithms are the packaged kernel's, tested upstream.
/// - `noreplace-smp`: a 1-vCPU guest would otherwise patch every SMP lock prefix to its UP
///   form at boot, and under TCG rewriting kernel text invalidates translated code (~130 ms).
pub fn kernel_cmdline(cfg: &Config, spec: &VmSpec) -> String {
    let log = format!("cocoon.log={}", cfg.log_level);
    let mut parts = vec![
        "console=ttyS0",
        "reboot=k",
        "panic=-1",
        "cryptomgr.notests",
        "noreplace-smp",
    ];
    if !cfg.debug_console {
        parts.push("quiet");
    }
    parts.push(&log);
    parts.extend(
        spec.kernel_params
            .iter()
            .map(String::as_str)
            .chain([cfg.kernel_params.as_str()])
            .filter(|s| !s.is_empty()),
    );
    parts.join(" ")
}

/// Both the kernel and the initramfs must be there before any process starts.
pub(crate) fn check_image(cfg: &Config) -> Result<()> {
    for (what, path) in [
        ("guest kernel", &cfg.kernel),
        ("guest initramfs", &cfg.initramfs),
    ] {
        if !path.is_file() {
            return Err(Error::ImageMissing {
                what,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

/// Starts the per-VM virtiofsd that serves the run directory's `shared/`; returns it and the
/// vhost-user socket it will create (wait for it with `daemon::wait_for_socket`).
pub(crate) fn spawn_virtiofsd(
    cfg: &Config,
    dir: &RunDir,
    bin: &Path,
) -> Result<(daemon::Daemon, PathBuf)> {
    let sock = dir.path("virtiofsd.sock");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", dir.shared().display()))
        .arg(format!("--cache={}", cfg.virtiofs_cache.as_arg()))
        .arg("--sandbox=none");
    let d = daemon::Daemon::spawn("virtiofsd", cmd, &dir.path("virtiofsd.log"))?;
    Ok((d, sock))
}

/// Longest wait for one connection attempt's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

fn unreachable(vm: &dyn Vmm, waited: Duration) -> Error {
    Error::AgentUnreachable {
        waited,
        console_tail: tail_lines(&vm.console_log(), 20),
    }
}

/// Waits for the guest to announce itself by connecting to host port `ready_port` over hybrid
/// vsock (vhost-device-vsock forwards guest connections to `<uds>_<port>`).
///
/// Knocking with `CONNECT` before the guest's vsock driver is up is not only wasted: with
/// vhost-device-vsock 0.3 a storm of early attempts can leave later ones unanswered for good
/// (seen here: the agent listening while every CONNECT for 28 s went unanswered). So in hybrid
/// mode the host stays silent until the guest says it listens.
async fn wait_for_ready(
    vm: &mut dyn Vmm,
    uds: &Path,
    ready_port: u32,
    timeout: Duration,
) -> Result<()> {
    let start = tokio::time::Instant::now();
    let path = PathBuf::from(format!("{}_{ready_port}", uds.display()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
    let result = loop {
        if let Some(e) = vm.exit_error() {
            break Err(e);
        }
        if start.elapsed() >= timeout {
            break Err(unreachable(vm, timeout));
        }
        if let Ok(Ok((mut s, _))) =
            tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
        {
            let mut b = [0u8; 16];
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::io::AsyncReadExt::read(&mut s, &mut b),
            )
            .await;
            break Ok(());
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&path);
    result
}

/// Connects to guest port `port`: retrying until the guest listens, the VM dies or `timeout`
/// passes. With hybrid vsock and a `ready_port`, first waits for the guest's ready call.
/// A dead or silent guest yields an error carrying the console tail.
pub async fn connect_guest(
    vm: &mut dyn Vmm,
    port: u32,
    ready_port: Option<u32>,
    timeout: Duration,
) -> Result<BoxedStream> {
    let start = tokio::time::Instant::now();
    let ep: VsockEndpoint = vm.agent_endpoint().clone();
    if let (VsockEndpoint::Hybrid(uds), Some(rp)) = (&ep, ready_port) {
        wait_for_ready(vm, uds, rp, timeout).await?;
    }
    let mut backoff = Backoff::default();
    loop {
        if let Some(e) = vm.exit_error() {
            return Err(e);
        }
        // Bound each attempt, not just the whole: a CONNECT that reaches the guest before its
        // vsock driver is up can be lost, and its reply then never comes.
        let left = timeout.saturating_sub(start.elapsed()).min(ATTEMPT_TIMEOUT);
        match tokio::time::timeout(left, connect_once(&ep, port)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => log::trace!("guest port {port} not ready: {e}"),
            Err(_) => {
                log::debug!("guest port {port}: no answer to CONNECT within {left:?}; retrying")
            }
        }
        if start.elapsed() >= timeout {
            return Err(unreachable(vm, timeout));
        }
        if let Some(d) = backoff.next() {
            tokio::time::sleep(d).await;
        }
    }
}

/// Finds a helper binary: a path is taken as is, a bare name is looked up on PATH and in the
/// places `make setup` and Debian install to.
pub(crate) fn resolve_binary(
    name: &'static str,
    key: &'static str,
    configured: &Path,
) -> Result<PathBuf> {
    let missing = || Error::BinaryMissing {
        name,
        key,
        path: configured.to_owned(),
    };
    if configured.components().count() > 1 {
        return if configured.is_file() {
            Ok(configured.to_owned())
        } else {
            Err(missing())
        };
    }
    if let Ok(p) = which::which(configured) {
        return Ok(p);
    }
    let extra = "/usr/local/bin:/usr/bin:/usr/libexec:/usr/lib/qemu";
    which::which_in(configured, Some(extra), "/").map_err(|_| missing())
}

/// The per-VM directory and the files the driver puts in it.
#[derive(Debug)]
pub(crate) struct RunDir {
    root: PathBuf,
    created_root: bool,
}

impl RunDir {
    fn create(root: &Path) -> Result<RunDir> {
        let created_root = !root.exists();
        std::fs::create_dir_all(root.join("shared"))
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        Ok(RunDir {
            root: root.to_owned(),
            created_root,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// The VMM exited on its own: its own output first (bad flags, KVM errors, unreadable
    /// files), then the guest console.
    fn vm_exited(&self, vmm_log: &str, status: String) -> Error {
        let own = tail_lines(&self.path(vmm_log), 10);
        let console = tail_lines(&self.console_log(), 20);
        let console_tail = match (own.trim().is_empty(), console.trim().is_empty()) {
            (true, _) => console,
            (false, true) => own,
            (false, false) => format!("{own}\n--- console ---\n{console}"),
        };
        Error::VmExited {
            status,
            console_tail,
        }
    }

    /// Removes the driver's files. The shared dir and the root go only if empty: whatever
    /// else is there (container rootfs mounts, state) belongs to the caller.
    fn remove(&self) -> Result<()> {
        for name in [
            "qmp.sock",
            "vsock.sock",
            "vhost-vsock.sock",
            "virtiofsd.sock",
            "virtiofsd.sock.pid",
            "console.log",
            "qemu.log",
            "ch-api.sock",
            "ch-api.sock.lock",
            "cloud-hypervisor.log",
            "virtiofsd.log",
            "vhost-device-vsock.log",
        ] {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("remove {}", self.path(name).display()),
                        e,
                    ))
                }
            }
        }
        // vhost-device-vsock creates "<uds-path>_<port>" sockets for guest-initiated connections.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vsock.sock_") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(self.shared());
        if self.created_root {
            let _ = std::fs::remove_dir(&self.root);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_make_setup() {
        let err = resolve_binary(
            "virtiofsd",
            "virtiofsd",
            Path::new("/nonexistent/virtiofsd"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("virtiofsd")
                && err.contains("make setup")
                && err.contains("paths.virtiofsd"),
            "{err}"
        );
        let err = resolve_binary(
            "qemu-system-x86_64",
            "qemu",
            Path::new("no-such-qemu-binary"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no-such-qemu-binary"), "{err}");
        assert_eq!(
            resolve_binary("sh", "x", Path::new("sh"))
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
    }

    #[test]
    fn kernel_cmdline_quiet_unless_debugging() {
        let mut cfg = Config {
            kernel_params: "x=1".into(),
            ..Config::default()
        };
        let mut spec = VmSpec::from_config(&cfg, "a");
        spec.kernel_params = vec!["p=2".into(), String::new()];
        assert_eq!(
            kernel_cmdline(&cfg, &spec),
            "console=ttyS0 reboot=k panic=-1 cryptomgr.notests noreplace-smp quiet cocoon.log=info p=2 x=1"
        );
        cfg.debug_console = true;
        assert!(!kernel_cmdline(&cfg, &spec).contains("quiet"));
    }

    #[test]
    fn run_dir_keeps_foreign_files() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("sb");
        let d = RunDir::create(&root).unwrap();
        std::fs::write(d.path("console.log"), "x").unwrap();
        std::fs::write(d.path("vsock.sock_1025"), "").unwrap();
        std::fs::write(d.path("state.json"), "{}").unwrap();
        d.remove().unwrap();
        assert!(!d.path("console.log").exists() && !d.path("vsock.sock_1025").exists());
        assert!(d.path("state.json").exists() && !d.shared().exists());
        std::fs::remove_file(d.path("state.json")).unwrap();
        d.remove().unwrap();
        assert!(!root.exists());
    }
}
