//! A plain process's stdout and stderr: the process writes a pipe, the agent copies the pipe
//! into the host's stream. runc gives a container pipes too, and programs depend on it: a
//! pipe can be reopened through `/dev/stdout` (`/proc/self/fd/1`), a socket can't (ENXIO;
//! nginx's image logs to `/dev/stdout`). The relay ends when the last writer is gone and the
//! pipe is empty; it then half-closes the stream, so the host reads EOF exactly when it would
//! have with the socket as the process's fd.

use std::os::fd::OwnedFd;

use crate::host_stream::HostStream;
use tokio::io::BufReader;

use super::{failed, Res};

/// Bytes copied per round: a full default pipe buffer, so a burst crosses vsock in one go.
const CHUNK: usize = 64 * 1024;

/// Copies the pipe's read end `pipe` into `host` until EOF, then half-closes `host`.
pub(super) fn drain(pipe: OwnedFd, host: HostStream) -> Res<()> {
    let from =
        tokio::net::unix::pipe::Receiver::from_owned_fd(pipe).map_err(failed("output pipe"))?;
    tokio::spawn(async move {
        let mut from = BufReader::with_capacity(CHUNK, from);
        let mut to = host;
        let r = tokio::io::copy_buf(&mut from, &mut to).await;
        let _ = to.shutdown_write();
        log::debug!("output relay ended: {r:?}");
    });
    Ok(())
}
