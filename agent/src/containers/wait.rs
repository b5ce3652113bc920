//! Exit statuses: the watcher that records a process's exit, and WaitProcess, which waits for
//! it.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use cocoon_protocol::ProcessRef;
use tokio::sync::{oneshot, watch};

use super::{Failure, Manager, Res};
use crate::reaper::Reaper;

/// (exit code, unix nanos) once the process exited and its output was drained.
pub(super) type Exit = watch::Receiver<Option<(i32, u64)>>;

impl Manager {
    /// The exit code and time of a process, once it has exited.
    pub async fn wait(&self, p: &ProcessRef) -> Res<(i32, u64)> {
        let proc = self.process(p)?;
        let mut rx = proc.exit.clone();
        let v = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Failure::Failed("exit watcher died".into()))?;
        Ok(v.unwrap_or((255, 0)))
    }
}

/// Publishes `pid`'s exit once the reaper has it and, for a terminal, once `output_done` says
/// the output relay drained the pty: a waiter that then reads the stream to EOF has it all.
/// With `kill_rest`, the container's remaining processes are killed through that
/// `cgroup.kill` first.
pub(super) fn watch_exit(
    reaper: Reaper,
    pid: i32,
    output_done: Option<oneshot::Receiver<()>>,
    kill_rest: Option<PathBuf>,
) -> Exit {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let code = reaper.wait(pid).await;
        if let Some(kill) = kill_rest {
            // Gone already when the cgroup went with the last process.
            match std::fs::write(&kill, "1") {
                Ok(()) => log::debug!("init {pid} exited: killed the rest ({})", kill.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("init {pid} exited; {}: {e}", kill.display()),
            }
        }
        if let Some(done) = output_done {
            let _ = done.await;
        }
        let _ = tx.send(Some((code, now_nanos())));
    });
    rx
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
