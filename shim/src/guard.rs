//! The pod's guard: a small process the shim daemon starts beside itself, which cleans up the
//! pod if the shim dies without tearing it down.
//!
//! containerd cleans up after a dead shim by running `<shim> delete` with the task's bundle as
//! its working directory, but only while containerd is up, and not at all when the bundle is
//! gone first: a `ctr task delete -f` (or any delete) racing with containerd's own dead-shim
//! clean-up removes the bundle, the `delete` can't start in it, and the VM, its helpers, its
//! tap and mounts live on with nobody to stop them (seen in CI on containerd 1.6). A shim
//! killed while containerd is down (an OOM kill during a node upgrade) is the same.
//!
//! So the guard holds the read end of a pipe whose write end only the shim holds
//! (close-on-exec: no VM process inherits it). The shim writes [`DONE`] once the pod is torn
//! down and before it exits; end of file without it means the shim is gone, and the guard does
//! what `delete` would ([`crate::state::cleanup`]) at once. The kernel closes the pipe however
//! the shim ends, SIGKILL included, which no signal handler or parent-death signal would
//! cover (a parent-death signal follows the spawning thread, and QEMU's `-runas` clears it).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::state::SandboxState;
use crate::{Error, Result};

/// The shim's first argument that makes it a pod's guard ([`guard_main`]).
pub const GUARD_ARG: &str = "__cocoon-guard";

/// What the shim writes when it ends normally, its pod already torn down.
const DONE: u8 = b'd';

/// How long an exiting shim waits for its guard to go.
const GUARD_EXIT: Duration = Duration::from_secs(2);

/// The shim's side of a running guard.
#[derive(Debug)]
pub struct Guard {
    child: tokio::process::Child,
}

impl Guard {
    /// Starts the guard of the pod whose run directory is `run_dir` and whose shim serves on
    /// `socket`.
    pub fn start(run_dir: &Path, socket: &str) -> Result<Guard> {
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg(GUARD_ARG)
            .arg(run_dir)
            .arg(socket)
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("start the pod's guard", e))?;
        log::debug!(
            "guard of {} started (pid {:?})",
            run_dir.display(),
            child.id()
        );
        Ok(Guard { child })
    }

    /// Tells the guard that the shim ends normally and waits (briefly) until it has gone, so
    /// that the shim reaps it rather than whoever inherits an orphan.
    pub async fn release(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(&[DONE]).await;
        }
        let Some(mut stdout) = self.child.stdout.take() else {
            return;
        };
        let mut rest = Vec::new();
        // The guard's stdout closes when it exits.
        if tokio::time::timeout(GUARD_EXIT, stdout.read_to_end(&mut rest))
            .await
            .is_err()
        {
            log::warn!("the pod's guard did not exit within {GUARD_EXIT:?}");
        }
    }
}

/// What the guard does, from its arguments (`<run dir> <shim socket> <shim pid>`): waits for
/// the shim's word or end, and cleans up the pod if the shim ended without it.
pub fn guard_main(args: &[String]) -> Result<()> {
    let [run_dir, socket, shim] = args else {
        return Err(Error::InvalidArgument(format!(
            "{GUARD_ARG} takes <run dir> <shim socket> <shim pid>, got {args:?}"
        )));
    };
    let shim: u32 = shim
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("shim pid {shim:?}")))?;
    if shim_ended_normally(&mut std::io::stdin().lock()) {
        return Ok(());
    }
    let run_dir = PathBuf::from(run_dir);
    if owned_by_another_shim(&run_dir, shim) {
        return Ok(());
    }
    crate::state::cleanup(&run_dir);
    crate::shim_socket::remove_dead_socket(socket);
    Ok(())
}

/// Reads the pipe to its end: whether the shim wrote [`DONE`] before it closed.
fn shim_ended_normally(pipe: &mut impl Read) -> bool {
    let mut buf = [0u8; 16];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) if buf[..n].contains(&DONE) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Whether the run directory now belongs to another shim (a new pod of the same name that
/// started after containerd's own clean-up), whose VM is not this guard's to stop.
fn owned_by_another_shim(run_dir: &Path, shim: u32) -> bool {
    SandboxState::load(run_dir)
        .and_then(|st| st.shim)
        .is_some_and(|owner| owner != shim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_word_or_its_end() {
        assert!(shim_ended_normally(&mut &[DONE][..]));
        assert!(shim_ended_normally(&mut &b"xxd"[..]));
        assert!(!shim_ended_normally(&mut &b""[..]));
        assert!(!shim_ended_normally(&mut &b"x"[..]));
    }

    #[test]
    fn a_run_dir_of_another_shim_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        assert!(!owned_by_another_shim(d.path(), 7), "no state: ours");
        let mut st = SandboxState {
            sandbox_id: "sb".into(),
            ..Default::default()
        };
        st.save(d.path()).unwrap();
        assert!(
            !owned_by_another_shim(d.path(), 7),
            "no owner recorded: ours"
        );
        st.shim = Some(7);
        st.save(d.path()).unwrap();
        assert!(!owned_by_another_shim(d.path(), 7));
        assert!(owned_by_another_shim(d.path(), 8));
    }
}
