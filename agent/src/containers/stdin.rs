//! A process's stdin and CloseStdin. A plain process reads a pipe that the agent feeds from the
//! host's stream, rather than the stream itself, so that CloseStdin can end its input: shutting
//! the stream's read side makes the relay forward what it has and close the pipe. A terminal's
//! stdin relay (see `tty`) ends the same way.

use std::os::fd::OwnedFd;

use crate::host_stream::HostStream;
use cocoon_protocol::ProcessRef;

use super::{failed, Failure, Manager, Res};

impl Manager {
    pub fn close_stdin(&self, p: &ProcessRef) -> Res<()> {
        let proc = self.process(p)?;
        if let Some(fd) = proc.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The relay sees EOF, forwards what it has, and closes the process's stdin.
            let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Read);
        }
        Ok(())
    }
}

/// A close-on-exec pipe for a plain process's stdin (read end to the runner, write end fed
/// here) or stdout/stderr (write end to the runner, read end drained by `output`).
pub(super) fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| Failure::Failed(format!("stdio pipe: {e}")))
}

/// Copies the host's stream into the pipe until EOF; answers a duplicate of the stream, for
/// CloseStdin to shut.
pub(super) fn feed(stream: HostStream, pipe: OwnedFd) -> Res<OwnedFd> {
    let stream = stream.into_socket().map_err(failed("stdin stream"))?;
    let dup = stream
        .dup_socket()
        .map_err(failed("dup the stdin stream"))?;
    let mut sink =
        tokio::net::unix::pipe::Sender::from_owned_fd(pipe).map_err(failed("stdin pipe"))?;
    tokio::spawn(async move {
        let mut s = stream;
        let r = tokio::io::copy(&mut s, &mut sink).await;
        log::debug!("stdin relay ended: {r:?}");
    });
    Ok(dup)
}
