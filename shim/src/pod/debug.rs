//! The debug console (`cocoon exec`): a command in the pod's guest, outside every container,
//! through the agent's DebugExec. Its streams are opened like an exec's, before the call that
//! claims them; what a session does with them is the admin endpoint's (`admin/exec.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use cocoon_protocol::agent as ag;
use cocoon_protocol::protobuf::MessageField;
use cocoon_protocol::{ProcessRef, StdioHello, StdioKind, DEBUG_CONTAINER};
use vmm_driver::vsock::BoxedStream;

use super::{GuestLink, Pod};
use crate::Result;

/// Names the pod's debug processes.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// A running debug process and its streams.
pub struct DebugSession {
    pub pid: u32,
    pub stdin: Option<BoxedStream>,
    /// The terminal's output when there is one.
    pub stdout: BoxedStream,
    pub stderr: Option<BoxedStream>,
    guest: GuestLink,
    process: ProcessRef,
}

impl std::fmt::Debug for DebugSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugSession")
            .field("pid", &self.pid)
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

impl Pod {
    /// Starts `args` in the guest, with a terminal if `tty`, and stdin if `stdin`.
    pub async fn debug_exec(
        &self,
        args: Vec<String>,
        tty: bool,
        stdin: bool,
    ) -> Result<DebugSession> {
        let guest = self.guest().await?;
        let exec_id = format!("debug-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let process = ProcessRef::exec(DEBUG_CONTAINER, exec_id.as_str());
        let open = |stream| {
            let hello = StdioHello {
                process: process.clone(),
                stream,
            };
            let guest = guest.clone();
            async move { guest.open_stdio(&hello).await }
        };
        let stdin_stream = match stdin {
            true => Some(open(StdioKind::Stdin).await?),
            false => None,
        };
        let stdout = open(StdioKind::Stdout).await?;
        let stderr = match tty {
            false => Some(open(StdioKind::Stderr).await?),
            true => None,
        };
        let req = ag::DebugExecRequest {
            exec_id,
            args,
            stdio: MessageField::some(ag::StdioStreams {
                stdin,
                stdout: true,
                stderr: !tty,
                terminal: tty,
                ..Default::default()
            }),
            ..Default::default()
        };
        let pid = guest
            .call("DebugExec", guest.agent.debug_exec(guest.ctx(), &req))
            .await?
            .pid;
        Ok(DebugSession {
            pid,
            stdin: stdin_stream,
            stdout,
            stderr,
            guest,
            process,
        })
    }
}

/// What a session does to its process while it runs; cheap to clone, apart from the streams.
#[derive(Debug, Clone)]
pub struct DebugControl {
    guest: GuestLink,
    process: ProcessRef,
}

impl DebugSession {
    /// The handle for waits, resizes and kills, apart from the streams.
    pub fn control(&self) -> DebugControl {
        DebugControl {
            guest: self.guest.clone(),
            process: self.process.clone(),
        }
    }
}

impl DebugControl {
    fn ids(&self) -> (String, String) {
        (
            self.process.container_id.clone(),
            self.process.exec_wire().to_owned(),
        )
    }

    /// Waits for the exit, however long it takes (the process is the operator's); its status.
    pub async fn wait(&self) -> Result<i32> {
        let (container_id, exec_id) = self.ids();
        let req = ag::WaitProcessRequest {
            container_id,
            exec_id,
            ..Default::default()
        };
        self.guest
            .agent
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map(|r| r.status)
            .map_err(|e| crate::Error::agent("WaitProcess", e))
    }

    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let (container_id, exec_id) = self.ids();
        let req = ag::TtyWinResizeRequest {
            container_id,
            exec_id,
            rows: u32::from(rows),
            cols: u32::from(cols),
            ..Default::default()
        };
        let g = &self.guest;
        g.call("TtyWinResize", g.agent.tty_win_resize(g.ctx(), &req))
            .await
            .map(|_| ())
    }

    /// Kills the process: the client left before it ended.
    pub async fn kill(&self) -> Result<()> {
        let (container_id, exec_id) = self.ids();
        let req = ag::SignalProcessRequest {
            container_id,
            exec_id,
            signal: 9,
            ..Default::default()
        };
        let g = &self.guest;
        g.call("SignalProcess", g.agent.signal_process(g.ctx(), &req))
            .await
            .map(|_| ())
    }
}
