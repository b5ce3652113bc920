//! A connection from the host, whichever channel brought it: a vsock connection, or one stream
//! of the multiplexed virtio-serial channel (`serial.rs`).
//!
//! A serial stream is read and written in place (the API's calls, a process's output): every
//! copy of the data is emulated work under TCG. Code that needs a socket fd (a terminal's
//! blocking relay threads, a stdin that CloseStdin shuts) asks for one with
//! [`HostStream::into_socket`], which bridges the stream to one end of a socket pair.

use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use cocoon_mux::MuxStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::VsockStream;

/// A bridge's copy size each way: a default pipe's worth (tokio's default is 8 KiB), which
/// yamux cuts into frames of one port write each.
const BRIDGE_BUF: usize = 64 * 1024;

/// One host connection.
#[derive(Debug)]
pub enum HostStream {
    Vsock(VsockStream),
    /// A stream of the serial channel's session.
    Mux(MuxStream),
    /// The agent's end of a socket pair bridged to a stream of the serial channel.
    Bridged(UnixStream),
}

impl HostStream {
    /// This connection with a socket under it: a serial stream is bridged to a socket pair,
    /// whose other end a task copies both ways until either side ends.
    pub fn into_socket(self) -> std::io::Result<HostStream> {
        let HostStream::Mux(mut stream) = self else {
            return Ok(self);
        };
        let (ours, theirs) = UnixStream::pair()?;
        tokio::spawn(async move {
            let mut ours = ours;
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut stream,
                &mut ours,
                BRIDGE_BUF,
                BRIDGE_BUF,
            )
            .await;
        });
        Ok(HostStream::Bridged(theirs))
    }

    /// A duplicate of the socket's fd; an error for a serial stream, which has none until
    /// [`Self::into_socket`].
    pub fn dup_socket(&self) -> std::io::Result<OwnedFd> {
        let fd = match self {
            HostStream::Vsock(s) => s.as_fd(),
            HostStream::Bridged(s) => s.as_fd(),
            HostStream::Mux(_) => {
                return Err(std::io::Error::other(
                    "a serial stream has no socket before into_socket",
                ))
            }
        };
        Ok(rustix::io::dup(fd)?)
    }
}

impl AsyncRead for HostStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HostStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
            HostStream::Mux(s) => Pin::new(s).poll_read(cx, buf),
            HostStream::Bridged(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HostStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            HostStream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
            HostStream::Mux(s) => Pin::new(s).poll_write(cx, buf),
            HostStream::Bridged(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HostStream::Vsock(s) => Pin::new(s).poll_flush(cx),
            HostStream::Mux(s) => Pin::new(s).poll_flush(cx),
            HostStream::Bridged(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HostStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
            HostStream::Mux(s) => Pin::new(s).poll_shutdown(cx),
            HostStream::Bridged(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
