//! Many byte streams over one: the agent's channel when it is a virtio-serial port (the
//! agent's and `vmm-driver`'s `serial.rs`), which has no ports of its own as vsock has.
//!
//! A yamux session (Parity's `yamux`, as libp2p uses it) whose connection is driven by one
//! task: yamux moves frames only while its connection is polled, opening a stream included.
//! Callers get an [`Opener`] to open streams and a channel of the streams the peer opened.
//! Received data waits in each stream's own buffer, up to its window, so a stream that nobody
//! reads holds up no other: the stdout of a process whose reader stalls does not stop the
//! agent's API calls.

use std::collections::VecDeque;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

pub use yamux::Mode;

/// One stream of the session, as a tokio byte stream.
pub type MuxStream = Compat<yamux::Stream>;

/// The most a virtio-serial port takes in one write (Linux's `virtio_console` caps each write
/// at 32 KiB): each write is one buffer on the device's queue, one notification of QEMU and one
/// write of QEMU's chardev socket, all emulated work under TCG. A frame's body fills one.
/// yamux writes the 12-byte header apart: joining the two in a write buffer cost more (a copy
/// of every byte, under TCG) than the extra small write saves (104 against 117 MB/s of stdout).
const FRAME_BODY: usize = 32 * 1024;

/// Buffered reads: yamux reads each frame's header, then its body; one read of the channel
/// takes many frames' worth.
const READ_BUF: usize = 64 * 1024;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the channel's session has ended")]
    Ended,
    #[error("open a stream: {0}")]
    Open(#[from] yamux::ConnectionError),
}

/// Opens streams on the session; cheap to clone.
#[derive(Debug, Clone)]
pub struct Opener(mpsc::UnboundedSender<oneshot::Sender<Result<MuxStream, Error>>>);

impl Opener {
    /// A new stream to the peer. Its first bytes reach the peer with the first write.
    pub async fn open(&self) -> Result<MuxStream, Error> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).map_err(|_| Error::Ended)?;
        rx.await.map_err(|_| Error::Ended)?
    }
}

/// Starts the session over `io` in a task of its own, which ends when the connection does
/// (then `open` fails and the inbound channel closes).
pub fn start<T>(io: T, mode: Mode) -> (Opener, mpsc::UnboundedReceiver<MuxStream>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut cfg = yamux::Config::default();
    cfg.set_split_send_size(FRAME_BODY);
    let io = tokio::io::BufReader::with_capacity(READ_BUF, io);
    let mut conn = yamux::Connection::new(io.compat(), cfg, mode);
    let (open_tx, mut open_rx) =
        mpsc::unbounded_channel::<oneshot::Sender<Result<MuxStream, Error>>>();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut waiting: VecDeque<oneshot::Sender<Result<MuxStream, Error>>> = VecDeque::new();
        let ended = futures_util::future::poll_fn(|cx| {
            while let Poll::Ready(Some(w)) = open_rx.poll_recv(cx) {
                waiting.push_back(w);
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(r) => {
                        if let Some(w) = waiting.pop_front() {
                            let _ = w.send(
                                r.map(FuturesAsyncReadCompatExt::compat)
                                    .map_err(Error::from),
                            );
                        }
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => {
                        let _ = in_tx.send(s.compat());
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(e)),
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        match ended {
            Some(e) => log::debug!("mux session ended: {e}"),
            None => log::debug!("mux session closed"),
        }
    });
    (Opener(open_tx), in_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream whose reader stalls holds up no other stream of the session.
    #[tokio::test]
    async fn a_stalled_stream_holds_up_no_other() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, _) = start(a, Mode::Client);
        let (_server, mut inbound) = start(b, Mode::Server);
        // The first stream's peer never reads: its writer fills the window and waits.
        let mut stalled = client.open().await.unwrap();
        let filler = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if stalled.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let _stalled_peer = inbound.recv().await.unwrap();
        let mut s = client.open().await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.flush().await.unwrap();
        let mut peer = tokio::time::timeout(std::time::Duration::from_secs(5), inbound.recv())
            .await
            .expect("the second stream arrives")
            .unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("its bytes arrive")
            .unwrap();
        assert_eq!(&got, b"ping");
        filler.abort();
    }
}
