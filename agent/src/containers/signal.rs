//! SignalProcess: one process by pid, or every process of the container (`all`) through
//! libcontainer, which walks the cgroup.

use cocoon_protocol::ProcessRef;
use libcontainer::signal::Signal as LcSignal;

use super::{blocking, load, Failure, Manager, Res};

impl Manager {
    pub async fn signal(&self, p: &ProcessRef, signal: u32, all: bool) -> Res<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| Failure::Invalid(format!("{signal} is not a signal number")))?;
        if all {
            self.get(&p.container_id)?;
            let cid = p.container_id.clone();
            let lc_sig =
                LcSignal::try_from(sig as i32).map_err(|e| Failure::Invalid(e.to_string()))?;
            return blocking(move || {
                load(&cid)?
                    .kill(lc_sig, true)
                    .map_err(|e| Failure::Failed(format!("kill: {e}")))
            })
            .await;
        }
        let proc = self.process(p)?;
        // The pid may already belong to someone else once the process is reaped.
        if proc.exit.borrow().is_some() {
            return Err(Failure::NotFound(format!(
                "process {} of {:?} has already exited",
                proc.pid, p.container_id
            )));
        }
        // ESRCH: it died and was reaped a moment before its exit is recorded; the same
        // answer as once it is (containerd's CRI takes NotFound for "already stopped").
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(proc.pid), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => Failure::NotFound(format!(
                "process {} of {:?} has already exited",
                proc.pid, p.container_id
            )),
            e => Failure::Failed(format!("kill {}: {e}", proc.pid)),
        })
    }
}
