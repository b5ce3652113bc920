//! A real `virtiofsd` started straight from a test (not through vmm-driver), on a directory of
//! the test's own, with the `--sandbox` mode the test names; [`Virtiofsd`] kills and reaps it,
//! and whatever it forked, on every path out of the test. The client side is `fuse_client`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::leaks::processes_mentioning;

/// Where `make setup` installs virtiofsd (`cargo install`), checked after PATH.
const INSTALLED: &str = "/usr/local/bin/virtiofsd";

/// The virtiofsd binary: the one on PATH, else the one `make setup` installs.
pub fn find_virtiofsd() -> Result<PathBuf, String> {
    which::which("virtiofsd")
        .ok()
        .or_else(|| Path::new(INSTALLED).is_file().then(|| INSTALLED.into()))
        .ok_or_else(|| {
            format!("virtiofsd is neither on PATH nor at {INSTALLED} (`make setup` installs it)")
        })
}

/// The virtiofsd binary. `make setup` installs it, so, as for every tool the set-up installs
/// (see `gate`), a host without it fails the test rather than skipping it.
pub fn virtiofsd_bin() -> PathBuf {
    find_virtiofsd().unwrap_or_else(|why| panic!("{why}"))
}

/// A running virtiofsd. Dropping it ends it: SIGTERM (virtiofsd `_exit`s on it, and the
/// sandbox's inner processes get SIGTERM as their parent-death signal), SIGKILL after a grace
/// period, then waits for the child and for every process naming the test's directory.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    /// The test's directory: every process of this daemon names it on its command line.
    dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Virtiofsd {
    /// Starts `bin --socket-path=<socket> --shared-dir=<share> --cache=never --sandbox=<mode>`
    /// with its output in `log`; `dir` holds all three.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        share: &Path,
        sandbox: &str,
    ) -> std::io::Result<Virtiofsd> {
        let socket = dir.join("vfs.sock");
        let log = dir.join("virtiofsd.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", share.display()))
            .arg("--cache=never")
            .arg(format!("--sandbox={sandbox}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Virtiofsd {
            child: Some(child),
            dir: dir.to_owned(),
            socket,
            log,
        })
    }

    /// Waits until the vhost-user socket exists; fails early if virtiofsd exits first.
    pub fn wait_for_socket(&mut self, timeout: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                return Err(std::io::Error::other(format!(
                    "virtiofsd exited ({}) before listening: {}",
                    status?,
                    self.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "no socket from virtiofsd in {timeout:?}: {}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// What virtiofsd has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends it now (as drop does) and returns once nothing of it runs.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The sandbox's inner processes are not our children: they end on their parent-death
        // signal. Wait for them; SIGKILL any left after the grace period (by pid, and only
        // processes naming this test's own temp dir).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_mentioning(&self.dir);
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                for p in &left {
                    if let Some(pid) = p.split(':').next().and_then(|s| s.parse().ok()) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                if Instant::now() > deadline + Duration::from_secs(5) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.end();
    }
}
