//! Relays between containerd's FIFOs and the agent's vsock stdio streams.
//!
//! FIFOs are opened read-write, which never blocks: a plain open would wait for the other end,
//! and containerd does not always open it (`ctr run` without `-i` still names a stdin FIFO).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vmm_driver::vsock::BoxedStream;

/// Copies containerd's stdin FIFO into the process's stdin stream until `close` fires
/// (containerd's CloseIO) or the stream breaks; then forwards what is still buffered in the
/// FIFO and half-closes the stream, so the process reads everything and then EOF.
pub fn relay_stdin(
    fifo: String,
    mut stream: BoxedStream,
    mut close: oneshot::Receiver<()>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut r = match pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&fifo)
        {
            Ok(r) => r,
            Err(e) => {
                log::warn!("open stdin {fifo}: {e}");
                let _ = stream.shutdown().await;
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(n) if n > 0 => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => break,
                },
                _ = &mut close => {
                    while let Ok(n) = r.try_read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
            }
        }
        let _ = stream.shutdown().await;
    })
}

/// Copies a process's output stream into containerd's FIFO until the stream ends.
pub fn relay_output(mut stream: BoxedStream, fifo: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        match pipe::OpenOptions::new().read_write(true).open_sender(&fifo) {
            Ok(mut w) => {
                let res = tokio::io::copy(&mut stream, &mut w).await;
                log::debug!("output {fifo}: {res:?}");
            }
            Err(e) => {
                log::warn!("open output {fifo}: {e}; discarding the output");
                let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
            }
        }
    })
}
