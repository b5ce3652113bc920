//! A plain process's stdout and stderr: the process writes a pipe, the agent copies the pipe
//! into the host's stream. runc gives a container pipes too, and programs depend on it: a
//! pipe can be reopened through `/dev/stdout` (`/proc/self/fd/1`), a socket can't (ENXIO;
//! nginx's image logs to `/dev/stdout`). The relay ends when the last writer is gone and the
//! pipe is empty; it then half-closes the stream, so the host reads EOF exactly when it would
//! have with the socket as the process's fd.

use std::os::fd::OwnedFd;

use crate::host_stream::HostStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe::Receiver;

use super::{failed, Res};

/// The output pipe's size (the kernel's `pipe-max-size` by default): a writer fills it before
/// it sleeps, and the relay takes it in one read, so a stream of output switches between the
/// writer and the relay a sixteenth as often as through the default 64 KiB pipe. Each switch
/// and each round of the relay is emulated work under TCG: `ctr task exec … dd` to the host's
/// stdout moved 117 MB/s with 64 KiB, 147 with 256 KiB and ~180 with 1 MiB (TCG, 2 cores).
/// Pipe pages exist only while they hold data, charged to the writer's memory cgroup.
const PIPE_SIZE: usize = 1024 * 1024;

/// The relay's first read buffer. It doubles, up to [`PIPE_SIZE`], each time a read fills it,
/// so only a process that streams output costs the agent a large buffer.
const FIRST_READ: usize = 64 * 1024;

/// A close-on-exec pipe for a plain process's stdout or stderr, of [`PIPE_SIZE`] bytes where
/// the kernel allows it (the default size where not).
pub(super) fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    let (r, w) = super::stdin::pipe()?;
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE) {
        log::debug!("output pipe of {PIPE_SIZE} bytes: {e}");
    }
    Ok((r, w))
}

/// Copies the pipe's read end `pipe` into `host` until EOF, then half-closes `host`.
pub(super) fn drain(pipe: OwnedFd, host: HostStream) -> Res<()> {
    let from = Receiver::from_owned_fd(pipe).map_err(failed("output pipe"))?;
    tokio::spawn(async move {
        let mut to = host;
        let r = relay(from, &mut to).await;
        let _ = to.shutdown().await;
        log::debug!("output relay ended: {r:?}");
    });
    Ok(())
}

/// Copies until EOF; answers the bytes moved.
async fn relay(mut from: Receiver, to: &mut HostStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; FIRST_READ];
    let mut moved = 0;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(moved);
        }
        to.write_all(&buf[..n]).await?;
        moved += n as u64;
        if n == buf.len() && buf.len() < PIPE_SIZE {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
