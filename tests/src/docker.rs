//! A private dockerd for the Docker tests and the bench: its own data root, exec root, socket,
//! managed containerd and bridge, `--iptables=false`, and Cocoon named in its daemon.json.
//!
//! dockerd must be ≥ 23 to name a shim v2 runtime. The system's is used when it is; otherwise
//! Debian 13's `docker.io` is fetched once into `target/test-deps/docker` by
//! `scripts/fetch-docker.sh` (a private apt configuration; nothing installed system-wide).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::config::{test_hypervisor, write_cocoon_toml};
use crate::leaks::{leftovers, mounts_mentioning, processes_mentioning};
use crate::paths::shim_dir;

/// The test image's name in Docker.
pub const DOCKER_IMAGE: &str = "cocoon-test:latest";
/// The daemon.json alias for Cocoon: `docker run --runtime cocoon`.
pub const ALIAS: &str = "cocoon";
/// The oldest dockerd that can name a shim v2 runtime.
const MIN_MAJOR: u32 = 23;

/// Where the Docker binaries come from.
#[derive(Debug, Clone)]
pub struct DockerBins {
    pub dockerd: PathBuf,
    pub docker: PathBuf,
    /// Put before the system's PATH: `docker-proxy` and `docker-init` live here.
    pub path: Vec<PathBuf>,
}

fn major(version_line: &str) -> Option<u32> {
    // "Docker version 26.1.5+dfsg1, build 411e817"
    version_line
        .split_whitespace()
        .nth(2)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn dockerd_major(dockerd: &Path) -> Option<u32> {
    let out = Command::new(dockerd).arg("--version").output().ok()?;
    major(&String::from_utf8_lossy(&out.stdout))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The system's dockerd when it is recent enough, else the fetched one (fetched now if it is
/// not there yet). `Err` says why there is none.
pub fn bins() -> Result<DockerBins, String> {
    static BINS: std::sync::OnceLock<Result<DockerBins, String>> = std::sync::OnceLock::new();
    BINS.get_or_init(find_bins).clone()
}

fn find_bins() -> Result<DockerBins, String> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let dockerd = Path::new(dir).join("dockerd");
        let docker = Path::new(dir).join("docker");
        if dockerd_major(&dockerd).is_some_and(|m| m >= MIN_MAJOR) && docker.is_file() {
            return Ok(DockerBins {
                dockerd,
                docker,
                path: vec![],
            });
        }
    }
    let prefix = std::env::var_os("COCOON_TEST_DOCKER_PREFIX").map_or_else(
        || workspace().join("target/test-deps/docker"),
        PathBuf::from,
    );
    let out = Command::new(workspace().join("scripts/fetch-docker.sh"))
        .arg(&prefix)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running scripts/fetch-docker.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/fetch-docker.sh {} failed: {}",
            prefix.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bins = DockerBins {
        dockerd: prefix.join("usr/sbin/dockerd"),
        docker: prefix.join("usr/bin/docker"),
        path: vec![prefix.join("usr/sbin"), prefix.join("usr/bin")],
    };
    match dockerd_major(&bins.dockerd) {
        Some(m) if m >= MIN_MAJOR => Ok(bins),
        m => Err(format!(
            "{} is version {m:?}, older than {MIN_MAJOR}",
            bins.dockerd.display()
        )),
    }
}

/// The daemon's config: Cocoon by its alias, and gVisor where `runsc` is installed (as a
/// runc-compatible runtime path, the way gVisor documents Docker), for the bench.
fn daemon_config() -> serde_json::Value {
    let mut runtimes = serde_json::json!({ALIAS: {"runtimeType": crate::containerd::RUNTIME}});
    if let Ok(runsc) = which_runsc() {
        runtimes["runsc"] = serde_json::json!({"path": runsc});
    }
    serde_json::json!({ "runtimes": runtimes })
}

fn which_runsc() -> Result<String, ()> {
    ["/usr/bin/runsc", "/usr/local/bin/runsc", "/usr/sbin/runsc"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .map(str::to_owned)
        .ok_or(())
}

/// The daemon's bridge: made by the test (`-b`), so dockerd never touches `docker0`, and
/// named after this process so that two tests never share one.
#[derive(Debug)]
struct Bridge {
    name: String,
}

impl Bridge {
    fn new() -> (Bridge, String) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let n = (pid + 37 * k) % 200 + 20;
        let name = format!("cdk{pid}x{k}");
        let gateway = format!("10.232.{n}.1");
        for args in [
            vec!["link", "add", "name", &name, "type", "bridge"],
            vec!["addr", "add", &format!("{gateway}/24"), "dev", &name],
            vec!["link", "set", &name, "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (Bridge { name }, gateway)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// A running private dockerd.
#[derive(Debug)]
pub struct Docker {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// Cocoon's state_dir for the shims of this daemon.
    pub cocoon_state: PathBuf,
    /// The bridge's address: the host's side of the default network.
    pub gateway: String,
    bins: DockerBins,
    child: Child,
    /// Removed after the daemon (dropped last).
    _bridge: Bridge,
}

impl Docker {
    /// Starts a daemon, or says why it can't (no dockerd ≥ 23 could be found or fetched).
    pub fn start() -> Result<Docker, String> {
        let bins = bins()?;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cocoon_state = d.join("cocoon");
        let cocoon_config = d.join("cocoon.toml");
        write_cocoon_toml(&cocoon_config, test_hypervisor(), &cocoon_state);
        let daemon_json = d.join("daemon.json");
        std::fs::write(&daemon_json, daemon_config().to_string()).unwrap();
        let (bridge, gateway) = Bridge::new();
        let socket = d.join("docker.sock");
        let mut path: Vec<PathBuf> = vec![shim_dir()];
        path.extend(bins.path.iter().cloned());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = Command::new(&bins.dockerd)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--config-file")
            .arg(&daemon_json)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge",
                &bridge.name,
            ])
            .env("PATH", std::env::join_paths(path).unwrap())
            .env("COCOON_CONFIG", &cocoon_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bins.dockerd.display()))?;
        let docker = Docker {
            dir,
            socket,
            cocoon_state,
            gateway,
            bins,
            child,
            _bridge: bridge,
        };
        let t0 = Instant::now();
        while !docker.docker(&["version"]).status.success() {
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!("dockerd did not start:\n{}", docker.log()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(docker)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The docker CLI against this daemon.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bins.docker);
        c.arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("cli"))
            .stdin(Stdio::null());
        c
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// `docker load`s the locally built test image as [`DOCKER_IMAGE`].
    pub fn load_test_image(&self) {
        let tarball = self.dir.path().join("image.tar");
        crate::containerd::build_docker_image(&tarball, DOCKER_IMAGE);
        let out = self.docker(&["load", "--input", tarball.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "docker load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Nothing of any Cocoon pod may be left: no shim or VM process, no mount or file in
    /// Cocoon's state dir.
    pub fn assert_clean(&self) {
        let ours = |p: &String| {
            p.contains("containerd-shim-cocoon")
                || p.contains("qemu")
                || p.contains("virtiofsd")
                || p.contains("vhost-device")
        };
        let t0 = Instant::now();
        let left = || -> Vec<String> {
            processes_mentioning(&self.cocoon_state)
                .into_iter()
                .chain(
                    processes_mentioning(self.dir.path())
                        .into_iter()
                        .filter(ours),
                )
                .collect()
        };
        while t0.elapsed() < Duration::from_secs(10) && !left().is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let procs = left();
        assert!(
            procs.is_empty(),
            "processes left behind: {procs:#?}\n{}",
            self.log()
        );
        let mounts = mounts_mentioning(&self.cocoon_state);
        assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
        let files = leftovers(&self.cocoon_state);
        assert!(files.is_empty(), "files left behind: {files:#?}");
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // What a failed test left: removed first, so their pods stop through the runtime.
        let ids = self.docker(&["ps", "--all", "--quiet"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "--force", id]);
        }
        // dockerd leaves a user-defined network's bridge behind when it stops.
        let nets = self.docker(&["network", "ls", "--quiet", "--filter", "type=custom"]);
        for id in String::from_utf8_lossy(&nets.stdout).split_whitespace() {
            let _ = self.docker(&["network", "rm", id]);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in processes_mentioning(self.dir.path()) {
            if let Some(pid) = p.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for line in mounts_mentioning(self.dir.path()).iter().rev() {
            if let Some(at) = line.split(' ').nth(4) {
                let _ = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_gives_the_major() {
        assert_eq!(
            major("Docker version 26.1.5+dfsg1, build 411e817"),
            Some(26)
        );
        assert_eq!(
            major("Docker version 20.10.24+dfsg1, build 297e128"),
            Some(20)
        );
        assert_eq!(major("nonsense"), None);
    }
}
