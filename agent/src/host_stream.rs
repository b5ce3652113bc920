//! A connection from the host, whichever channel brought it: a vsock connection, or one stream
//! of the multiplexed virtio-serial channel (`serial.rs`), which reaches the agent's code as
//! one end of a socket pair so that it is a socket too: the stdio code hands such an fd to a
//! process or a blocking relay thread, whatever the channel.

use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::VsockStream;

/// One host connection.
#[derive(Debug)]
pub enum HostStream {
    Vsock(VsockStream),
    /// The agent's end of a socket pair bridged to a stream of the serial channel.
    Bridged(UnixStream),
}

impl HostStream {
    /// Half-closes the stream: the host reads end of file.
    pub fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            HostStream::Vsock(s) => s.shutdown(std::net::Shutdown::Write),
            HostStream::Bridged(s) => {
                rustix::net::shutdown(s, rustix::net::Shutdown::Write).map_err(Into::into)
            }
        }
    }
}

impl AsFd for HostStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            HostStream::Vsock(s) => s.as_fd(),
            HostStream::Bridged(s) => s.as_fd(),
        }
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
            HostStream::Bridged(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HostStream::Vsock(s) => Pin::new(s).poll_flush(cx),
            HostStream::Bridged(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HostStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
            HostStream::Bridged(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
