//! Child processes that must never outlive their VM: find the binary, spawn with logs
//! captured, wait for its socket, stop with SIGTERM then SIGKILL, and always reap.
//!
//! The hypervisor itself and every helper (virtiofsd, vhost-device-vsock) go through here, so
//! the timeouts and the way a dead process is reported are the same for all of them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// How long a helper daemon (or CH's API server) may take to create its socket.
pub(crate) const DAEMON_READY: Duration = Duration::from_secs(10);
/// Grace for a process asked to exit before it is killed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);

/// Finds a helper binary: a path is taken as is, a bare name is looked up on PATH and in the
/// places `make setup` and Debian install to.
pub fn resolve_binary(name: &'static str, key: &'static str, configured: &Path) -> Result<PathBuf> {
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

/// A VMM's exit status, followed by the helpers that are dead too. Which went first is not
/// known once both are gone (a helper killed after the boot finished takes the VMM with it,
/// and the supervisor may see the VMM first), so the helpers are named rather than guessed at.
pub(crate) fn with_helpers(vmm: ExitStatus, helpers: Option<Error>) -> String {
    match helpers {
        Some(Error::DaemonExited { name, status, .. }) => {
            format!("{vmm}; {name} exited too ({status})")
        }
        _ => vmm.to_string(),
    }
}

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat` field 22): a pid
/// and its start time name one process even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The helper that has exited, as the error that names it and quotes its log. When several
/// have, the one a signal ended (a kill, a crash) is named first: the others likely exited
/// after it, as their peer went away (virtiofsd does once QEMU gave up on a dead vsock
/// daemon). The order is not certain (the shim library's reaper may have taken a status, which
/// then reads 255), so the others are named too.
pub(crate) fn first_exited<'a>(
    helpers: impl IntoIterator<Item = &'a mut Option<Daemon>>,
) -> Option<Error> {
    use std::os::unix::process::ExitStatusExt;
    let mut dead: Vec<(&'static str, ExitStatus, String)> = helpers
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d.name, d.try_exited()?, d.log_tail(10))))
        .collect();
    dead.sort_by_key(|(_, status, _)| status.signal().is_none());
    let mut dead = dead.into_iter();
    let (name, status, log_tail) = dead.next()?;
    let mut status = status.to_string();
    for (other, s, _) in dead {
        status.push_str(&format!("; {other} exited too ({s})"));
    }
    Some(Error::DaemonExited {
        name,
        status,
        log_tail,
    })
}

/// A running helper (qemu, virtiofsd, vhost-device-vsock) with its stdout/stderr in `log`.
#[derive(Debug)]
pub struct Daemon {
    pub name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// For the tests here: the driver spawns through `RunDir::spawn`, which keeps the crash
    /// record.
    #[cfg(test)]
    pub fn spawn(name: &'static str, cmd: Command, log: &Path) -> Result<Daemon> {
        Daemon::spawn_in(name, cmd, log, None)
    }

    /// [`Daemon::spawn`], in the network namespace at `netns` if given. `setns` moves only the
    /// calling thread and a child starts where its parent thread is, so the spawn happens on a
    /// thread of its own that joined the namespace; the runtime's threads never move.
    pub fn spawn_in(
        name: &'static str,
        cmd: Command,
        log: &Path,
        netns: Option<&Path>,
    ) -> Result<Daemon> {
        let Some(netns) = netns else {
            return Daemon::spawn_here(name, cmd, log);
        };
        let ns = std::fs::File::open(netns)
            .map_err(|e| Error::io(format!("open network namespace {}", netns.display()), e))?;
        let runtime = tokio::runtime::Handle::current();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::io(
                        format!("join network namespace {}", netns.display()),
                        std::io::Error::from(e),
                    )
                })?;
                let _in_runtime = runtime.enter();
                Daemon::spawn_here(name, cmd, log)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::io(
                    "spawn in a netns",
                    std::io::Error::other("the thread panicked"),
                ))
            })
        })
    }

    fn spawn_here(name: &'static str, mut cmd: Command, log: &Path) -> Result<Daemon> {
        let out = private_file(log)?;
        let err = out.try_clone().map_err(|e| Error::io("dup log fd", e))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|source| Error::Spawn { name, source })?;
        let pid = child.id().unwrap_or(0);
        log::debug!("started {name} (pid {pid})");
        Ok(Daemon {
            name,
            child,
            pid,
            log: log.to_owned(),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the supervisor (`supervise.rs`) needs to watch this process.
    pub(crate) fn watched(&self) -> Watched {
        Watched {
            name: self.name,
            pid: self.pid,
            log: self.log.clone(),
        }
    }

    /// The exit status if the process has ended (and is now reaped).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = match self.child.try_wait() {
                Ok(s) => s,
                Err(e) => reaped_elsewhere(self.name, &e),
            };
        }
        self.status
    }

    /// Sends SIGKILL now, without waiting; [`Daemon::wait`] or [`Daemon::stop`] reaps it.
    pub fn kill(&mut self) {
        if self.try_exited().is_none() {
            let _ = self.child.start_kill();
        }
    }

    /// Waits for the process to end on its own.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = match self.child.wait().await {
            Ok(s) => s,
            Err(e) => reaped_elsewhere(self.name, &e)
                .ok_or_else(|| Error::io(format!("wait for {}", self.name), e))?,
        };
        self.status = Some(s);
        Ok(s)
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps in every case. Returns only once
    /// the daemon's own children are gone too: virtiofsd's sandbox serves from a forked child
    /// (in its own pid namespace) that outlives the parent by a moment.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.try_exited() {
            return Ok(s);
        }
        let children = children_of(self.pid);
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(grace, self.wait()).await {
            Ok(r) => r,
            Err(_) => {
                log::warn!(
                    "{} (pid {}) ignored SIGTERM for {grace:?}; killing it",
                    self.name,
                    self.pid
                );
                let _ = self.child.start_kill();
                self.wait().await
            }
        };
        self.wait_gone(&children, grace).await;
        status
    }

    /// Waits up to `grace` for `pids` to end (a zombie has ended), then SIGKILLs what is left
    /// and waits for that too (bounded: a process in uninterruptible sleep is reported).
    async fn wait_gone(&self, pids: &[i32], grace: Duration) {
        let alive = || -> Vec<i32> { pids.iter().copied().filter(|p| running(*p)).collect() };
        let until_gone = |limit: Duration| async move {
            let start = tokio::time::Instant::now();
            while !alive().is_empty() && start.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        until_gone(grace).await;
        let left = alive();
        if left.is_empty() {
            return;
        }
        log::warn!("{}: children {left:?} outlived it; killing them", self.name);
        for p in left {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        until_gone(Duration::from_secs(1)).await;
        let left = alive();
        if !left.is_empty() {
            log::error!("{}: children {left:?} survived SIGKILL", self.name);
        }
    }

    /// Last `n` lines of the daemon's own output, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log, n)
    }
}

/// Creates (or truncates) a file only root can read: logs hold guest output and paths.
pub(crate) fn private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    // An existing file keeps its mode through open(2): set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    Ok(f)
}

/// Sets a socket (or file) a helper created to 0600: the run directory is 0700 already, but
/// a socket that reaches a guest's agent should not depend on one directory's mode alone.
pub(crate) fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

/// The direct children of `pid` (from `/proc`), e.g. virtiofsd's sandboxed server.
pub fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` still runs: it exists and is not a zombie.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// A host process that reaps with `waitpid(-1)` (the containerd shim library does, for its
/// subreaper duty) can take a child's status before we ask: ECHILD then means "gone", with the
/// status unknown (reported as 255).
fn reaped_elsewhere(name: &str, e: &std::io::Error) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    if e.raw_os_error() == Some(libc_echild()) {
        log::debug!("{name} was reaped by another waiter; its status is unknown");
        Some(ExitStatus::from_raw(255 << 8))
    } else {
        None
    }
}

fn libc_echild() -> i32 {
    nix::errno::Errno::ECHILD as i32
}

/// Waits up to `timeout` for a daemon to exit on its own; true if it did (or never ran).
pub async fn exited_within(d: Option<&mut Daemon>, timeout: Duration) -> bool {
    match d {
        Some(d) => tokio::time::timeout(timeout, d.wait()).await.is_ok(),
        None => true,
    }
}

/// A process to watch: its name, pid and log file.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: &'static str,
    pub pid: u32,
    pub log: PathBuf,
}

/// How much of a file's end [`tail_lines`] reads: the guest writes the console, so its size
/// is the guest's choice, and an error path must not read all of it.
const TAIL_WINDOW: u64 = 64 * 1024;

/// Last `n` lines of a text file, from at most its last 64 KiB; empty if it cannot be read.
pub fn tail_lines(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(TAIL_WINDOW);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `socket` exists, failing early if the daemon dies first.
pub async fn wait_for_socket(d: &mut Daemon, socket: &Path, waited: Duration) -> Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        if socket.exists() {
            return Ok(());
        }
        if let Some(status) = d.try_exited() {
            return Err(Error::DaemonExited {
                name: d.name,
                status: status.to_string(),
                log_tail: d.log_tail(20),
            });
        }
        if start.elapsed() >= waited {
            return Err(Error::DaemonNotReady {
                name: d.name,
                socket: socket.to_owned(),
                waited,
                log_tail: d.log_tail(20),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let tail = tail_lines(&p, 20);
        assert!(
            tail.starts_with("line 11\n") && tail.ends_with("line 30"),
            "{tail}"
        );
        assert_eq!(tail_lines(&dir.path().join("missing"), 5), "");
        // A huge file: only its end is read, and the first, partial line is dropped.
        let big: String = (0..200_000).map(|i| format!("l{i}\n")).collect();
        std::fs::write(&p, big).unwrap();
        assert_eq!(tail_lines(&p, 2), "l199998\nl199999");
        let one = tail_lines(&p, 100_000);
        assert!(one.lines().count() < 20_000 && one.ends_with("l199999"));
        assert!(one.lines().next().unwrap().starts_with('l'));
    }

    #[test]
    fn logs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(private_file(&p).unwrap());
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!((meta.permissions().mode() & 0o777, meta.len()), (0o600, 0));
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]);
        let mut d = Daemon::spawn("stubborn", cmd, &dir.path().join("log")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = d.stop(Duration::from_millis(200)).await.unwrap();
        assert!(!status.success());
        let pid = Pid::from_raw(i32::try_from(d.pid()).unwrap());
        assert!(
            kill(pid, None).is_err(),
            "process {pid} still exists after stop"
        );
    }

    #[tokio::test]
    async fn stop_waits_for_the_daemons_children() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        // A child that ignores SIGTERM and would outlive its parent, like a sandboxed server.
        cmd.args([
            "-c",
            "sh -c 'trap \"\" TERM; while :; do sleep 0.05; done' & wait",
        ]);
        let mut d = Daemon::spawn("forking", cmd, &dir.path().join("log")).unwrap();
        let mut kids = vec![];
        for _ in 0..100 {
            kids = children_of(d.pid());
            if !kids.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(kids.len(), 1, "the child never started");
        d.stop(Duration::from_millis(300)).await.unwrap();
        assert!(!running(kids[0]), "child {} outlived stop", kids[0]);
    }

    #[tokio::test]
    async fn early_exit_is_reported_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'bad flag --x' >&2; exit 3"]);
        let mut d = Daemon::spawn("helper", cmd, &dir.path().join("log")).unwrap();
        let err = wait_for_socket(
            &mut d,
            &dir.path().join("never.sock"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("helper exited early") && err.contains("bad flag --x"),
            "{err}"
        );
    }

    /// Of two dead helpers, the one a signal ended is named, whatever the order: the other
    /// exited with an error because its peer went away.
    #[tokio::test]
    async fn of_several_dead_helpers_the_killed_one_is_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let mut failed = Command::new("sh");
        failed.args(["-c", "exit 3"]);
        let mut failed = Daemon::spawn("virtiofsd", failed, &dir.path().join("a")).unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut killed =
            Daemon::spawn("vhost-device-vsock", sleeper, &dir.path().join("b")).unwrap();
        killed.kill();
        failed.wait().await.unwrap();
        killed.wait().await.unwrap();
        let (mut a, mut b) = (Some(failed), Some(killed));
        let e = first_exited([&mut a, &mut b]).unwrap().to_string();
        assert!(e.starts_with("vhost-device-vsock exited"), "{e}");
        assert!(e.contains("virtiofsd exited too (exit status: 3)"), "{e}");
        let mut none: Option<Daemon> = None;
        assert!(first_exited([&mut none]).is_none());
    }
}
