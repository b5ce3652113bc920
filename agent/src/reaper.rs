//! PID 1 reaps every process in the guest: container inits and execs (reparented to us when
//! the runner helper exits), the helpers themselves, and stray orphans. Whoever wants a
//! process's status registers for its pid; a status that arrives first is kept until asked,
//! for a while: stray orphans nobody asks about must not pile up, nor hand a stale status to
//! a later process that reuses the pid.
//!
//! Because this reaps with `waitpid(-1)`, nothing else in the agent may wait for children
//! (no `std::process::Child::wait`, no `tokio::process`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::sync::oneshot;

/// Exit code as a shell reports it: the code, or 128 + signal for a killed process.
pub fn exit_code(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

/// How long an unclaimed status is kept. Waiters register right after a process starts
/// (milliseconds), so this only has to cover that gap.
const KEEP_UNCLAIMED: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Inner {
    /// Statuses that arrived before anyone asked: code and arrival time.
    exited: HashMap<i32, (i32, Instant)>,
    waiters: HashMap<i32, oneshot::Sender<i32>>,
}

/// Shared reaper state.
#[derive(Debug, Clone, Default)]
pub struct Reaper(Arc<Mutex<Inner>>);

impl Reaper {
    /// Waits for `pid` to exit and returns its exit code.
    pub async fn wait(&self, pid: i32) -> i32 {
        let rx = {
            let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((code, _)) = g.exited.remove(&pid) {
                return code;
            }
            let (tx, rx) = oneshot::channel();
            g.waiters.insert(pid, tx);
            rx
        };
        // The sender only goes away with the reaper itself, i.e. never while PID 1 runs.
        rx.await.unwrap_or(255)
    }

    fn deliver(&self, pid: i32, code: i32) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match g.waiters.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(code);
            }
            None => {
                let now = Instant::now();
                prune(&mut g.exited, now);
                g.exited.insert(pid, (code, now));
            }
        }
    }

    /// Reaps everything that has exited so far.
    pub fn reap_now(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some((pid, code)) = exit_code(status) {
                        log::debug!("reaped pid {pid}: exit {code}");
                        self.deliver(pid, code);
                    }
                }
            }
        }
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut sigchld) = signal(SignalKind::child()) else {
            log::error!("cannot watch SIGCHLD; processes will not be reaped");
            return;
        };
        self.reap_now();
        while sigchld.recv().await.is_some() {
            self.reap_now();
        }
    }
}

/// Drops unclaimed statuses older than [`KEEP_UNCLAIMED`].
fn prune(exited: &mut HashMap<i32, (i32, Instant)>, now: Instant) {
    exited.retain(|_, (_, at)| now.saturating_duration_since(*at) < KEEP_UNCLAIMED);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let p = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(p, 3)), Some((7, 3)));
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some((7, 137))
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[tokio::test]
    async fn status_before_or_after_the_waiter_is_delivered() {
        let r = Reaper::default();
        r.deliver(10, 3);
        assert_eq!(r.wait(10).await, 3);
        let r2 = r.clone();
        let w = tokio::spawn(async move { r2.wait(11).await });
        tokio::task::yield_now().await;
        r.deliver(11, 137);
        assert_eq!(w.await.unwrap(), 137);
    }

    #[test]
    fn unclaimed_statuses_expire() {
        let now = Instant::now();
        let mut m = HashMap::new();
        m.insert(1, (0, now));
        let old = now
            .checked_sub(KEEP_UNCLAIMED + Duration::from_secs(1))
            .expect("the monotonic clock has run for more than a minute");
        m.insert(2, (9, old));
        prune(&mut m, now);
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), [1]);
    }

    #[tokio::test]
    async fn a_status_that_arrives_first_is_kept_for_its_waiter() {
        let r = Reaper::default();
        r.deliver(42, 3);
        assert_eq!(r.wait(42).await, 3);
    }
}
