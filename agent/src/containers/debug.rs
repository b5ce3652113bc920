//! DebugExec: a command in the guest itself, outside every container (`cocoon exec`, the
//! debug console). It runs as the agent does (guest root, the guest's namespaces, no cgroup
//! or seccomp of a container), through the `debug-exec` helper (`crate::debug_exec`), which
//! makes it a session leader and, with a terminal, gives it the pty as its controlling
//! terminal before it execs: a process can only do that to itself. The agent serves the call
//! only in a VM booted with the debug console (`crate::server`); these processes are named
//! by [`DEBUG_CONTAINER`] in the calls that name a process.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use cocoon_protocol::agent::StdioStreams;
use cocoon_protocol::{ProcessRef, DEBUG_CONTAINER};

use super::launch::Wiring;
use super::tty::relay_terminal;
use super::wait::watch_exit;
use super::{check_id, dup, failed, Failure, Manager, Process, Res};

impl Manager {
    /// Starts `args` in the guest with the stdio `stdio` announces; answers its pid.
    pub async fn debug_exec(
        &self,
        exec_id: &str,
        args: &[String],
        stdio: &StdioStreams,
    ) -> Res<i32> {
        check_id("exec", exec_id)?;
        if args.is_empty() || args[0].is_empty() {
            return Err(Failure::Invalid("no command to run".into()));
        }
        {
            let mut debug = self.debug.lock().unwrap_or_else(|e| e.into_inner());
            // Those already over and waited for need no name any more.
            debug.retain(|_, p| p.exit.borrow().is_none());
            if debug.contains_key(exec_id) {
                return Err(Failure::Exists(format!("debug process {exec_id:?} exists")));
            }
        }
        let p = ProcessRef::exec(DEBUG_CONTAINER, exec_id);
        let streams = self.claim_streams(&p, stdio).await?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg(crate::debug_exec::ARG);
        let (child, relays) = if stdio.terminal {
            let pty = nix::pty::openpty(None, None).map_err(|e| failed("open a pty")(e.into()))?;
            cmd.arg("--tty")
                .stdin(Stdio::from(dup(&pty.slave)?))
                .stdout(Stdio::from(dup(&pty.slave)?))
                .stderr(Stdio::from(pty.slave));
            cmd.arg("--").args(args);
            let child = cmd.spawn().map_err(failed("start the debug-exec helper"))?;
            drop(cmd); // the agent's copies of the pty's slave side
            let relays = relay_terminal(pty.master, streams.stdin, streams.stdout)?;
            (child, relays)
        } else {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let wiring = Wiring::plain(&mut cmd, streams)?;
            cmd.arg("--").args(args);
            let child = cmd.spawn().map_err(failed("start the debug-exec helper"))?;
            drop(cmd);
            (child, wiring.attach()?)
        };
        let pid = i32::try_from(child.id()).unwrap_or(0);
        drop(child); // reaped by the Reaper
        log::warn!("debug console: pid {pid} runs {args:?} in the guest (exec {exec_id})");
        let proc = Arc::new(Process {
            pid,
            exit: watch_exit(self.reaper.clone(), pid, relays.output_done, None),
            stdin: Mutex::new(relays.stdin),
            tty: relays.tty,
        });
        self.debug
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_owned(), proc);
        Ok(pid)
    }

    /// A debug process by exec id.
    pub(super) fn debug_process(&self, exec_id: Option<&str>) -> Res<Arc<Process>> {
        let debug = self.debug.lock().unwrap_or_else(|e| e.into_inner());
        exec_id
            .and_then(|e| debug.get(e).cloned())
            .ok_or_else(|| Failure::NotFound(format!("debug process {exec_id:?} not found")))
    }
}
