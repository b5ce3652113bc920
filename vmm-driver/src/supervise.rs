//! Helper supervision. A VM is whole only while its VMM and every helper run: a dead virtiofsd
//! leaves the guest's file requests hanging for ever, and a dead vhost-device-vsock cuts the
//! agent off. So while the VM runs, a supervisor holds a pidfd of each process; when a helper
//! exits on its own, it logs which one, with the last lines of its log, and kills the VMM
//! through its pidfd (a pid that was reused meanwhile is never hit). The caller then sees the
//! VM gone, as after any VMM death: its processes end and its cleanup runs as usual.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::task::JoinHandle;

use crate::daemon::{tail_lines, Watched};
use crate::error::{Error, Result};

fn pidfd(pid: u32) -> Result<OwnedFd> {
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let pid = raw.ok_or_else(|| Error::io("open a pidfd", std::io::Error::other("no such pid")))?;
    pidfd_open(pid, PidfdFlags::NONBLOCK).map_err(|e| Error::io("open a pidfd", e.into()))
}

/// How often the pidfds are looked at: the longest a dead helper goes unnoticed.
const EVERY: Duration = Duration::from_millis(250);

/// Whether the process behind `fd` has exited: a pidfd turns readable then. A zero-timeout
/// poll, so it never blocks the runtime (tokio's `AsyncFd` would take `unsafe` to register a
/// raw pidfd).
fn exited(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
}

/// Watches the helpers of one VM until stopped.
#[derive(Debug)]
pub struct Supervisor {
    task: JoinHandle<()>,
}

impl Supervisor {
    /// Starts watching `helpers` on behalf of the VMM `vmm`, for the VM `vm`.
    pub fn start(vm: &str, vmm: &Watched, helpers: &[Watched]) -> Result<Supervisor> {
        let vmm_fd = pidfd(vmm.pid)?;
        let mut watched = Vec::with_capacity(helpers.len());
        for h in helpers {
            watched.push((h.clone(), pidfd(h.pid)?));
        }
        let (vm, vmm) = (vm.to_owned(), vmm.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            let dead = loop {
                tick.tick().await;
                if exited(&vmm_fd) {
                    // The VMM went first (its helpers follow it): the caller sees that itself.
                    return;
                }
                if let Some((h, _)) = watched.iter().find(|(_, fd)| exited(fd)) {
                    break h.clone();
                }
            };
            log::error!(
                "VM {vm}: {} (pid {}) exited; stopping the VM ({} pid {}). Last lines of {}:\n{}",
                dead.name,
                dead.pid,
                vmm.name,
                vmm.pid,
                dead.log.display(),
                tail_lines(&dead.log, 10).trim_end()
            );
            if let Err(e) = pidfd_send_signal(&vmm_fd, Signal::KILL) {
                log::warn!("VM {vm}: killing {}: {e}", vmm.name);
            }
        });
        Ok(Supervisor { task })
    }

    /// Stops watching: the caller is about to stop the VM itself.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
