//! Relays between containerd's FIFOs and the agent's vsock stdio streams.
//!
//! FIFOs are opened read-write, which never blocks: a plain open would wait for the other end,
//! and containerd does not always open it (`ctr run` without `-i` still names a stdin FIFO).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// A process's output relays, and how many bytes they have moved so far.
#[derive(Debug, Default)]
pub struct Outputs {
    tasks: Vec<JoinHandle<()>>,
    moved: Arc<AtomicU64>,
}

impl Outputs {
    /// Starts relaying `stream` into containerd's FIFO `fifo` until the stream ends.
    pub fn relay(&mut self, stream: BoxedStream, fifo: String) {
        self.tasks
            .push(relay_output(stream, fifo, self.moved.clone()));
    }

    /// Stops every relay now, closing its FIFO: for a process that never started.
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Waits until every relay has finished, or until none has moved a byte for `idle`: a
    /// process that exited may have left a child behind that holds its output open, and its
    /// exit must not wait for that child. Relays still open keep running. True if all ended.
    pub async fn drain(self, idle: Duration) -> bool {
        let Outputs { tasks, moved } = self;
        let all = futures_util::future::join_all(tasks);
        tokio::pin!(all);
        let mut last = moved.load(Ordering::Relaxed);
        loop {
            if tokio::time::timeout(idle, &mut all).await.is_ok() {
                return true;
            }
            let now = moved.load(Ordering::Relaxed);
            if now == last {
                return false;
            }
            last = now;
        }
    }
}

/// Copies a process's output stream into containerd's FIFO until the stream ends, counting
/// the bytes in `moved`.
fn relay_output(mut stream: BoxedStream, fifo: String, moved: Arc<AtomicU64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = match pipe::OpenOptions::new().read_write(true).open_sender(&fifo) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("open output {fifo}: {e}; discarding the output");
                let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = w.write_all(&buf[..n]).await {
                        log::debug!("output {fifo}: {e}");
                        break;
                    }
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    log::debug!("output {fifo}: {e}");
                    break;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &tempfile::TempDir, name: &str) -> String {
        let p = dir.path().join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[tokio::test]
    async fn output_held_open_by_a_silent_child_does_not_hold_the_exit() {
        let dir = tempfile::tempdir().unwrap();
        let (guest_end, host_end) = tokio::io::duplex(1024);
        let mut outputs = Outputs::default();
        outputs.relay(Box::pin(host_end), fifo(&dir, "out"));
        let t0 = std::time::Instant::now();
        // The guest end stays open and silent: drain gives up after the idle time.
        assert!(!outputs.drain(Duration::from_millis(200)).await);
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(guest_end);
    }

    #[tokio::test]
    async fn output_that_ends_or_keeps_moving_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let (mut guest_end, host_end) = tokio::io::duplex(1024);
        let out = fifo(&dir, "out");
        let mut reader = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&out)
            .unwrap();
        let mut outputs = Outputs::default();
        outputs.relay(Box::pin(host_end), out);
        // Writes for longer than the idle time, in steps shorter than it, then ends.
        let writer = tokio::spawn(async move {
            for _ in 0..6 {
                guest_end.write_all(b"x").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        assert!(outputs.drain(Duration::from_millis(250)).await);
        writer.await.unwrap();
        let mut got = [0u8; 6];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"xxxxxx");
    }
}
