//! The guest's serial console, written to `console.log` with a size cap.
//!
//! The guest decides how much it prints, and the run dir lives on a tmpfs (`/run`): a console
//! written straight to a file by the VMM grows without bound. Instead QEMU's serial port is a
//! socket chardev that connects to this relay, which writes `console.log` and, once it holds
//! [`CONSOLE_CAP`] bytes, moves it to `console.log.1` (replacing the older one) and starts a
//! new one: at most two caps on disk, and the newest output is always in `console.log`, where
//! the error paths read their tail. If the relay is gone (the shim died), QEMU drops the
//! output rather than stalling the guest.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::daemon::private_file;
use crate::error::{Error, Result};

/// The most one console file holds.
pub const CONSOLE_CAP: u64 = 1 << 20;

/// The relay task; it ends when the VMM closes the console, and is aborted on drop.
#[derive(Debug)]
pub(crate) struct ConsoleRelay {
    task: JoinHandle<()>,
}

impl Drop for ConsoleRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConsoleRelay {
    /// Waits up to `within` for the relay to write what the VMM sent before it closed.
    pub(crate) async fn finish(mut self, within: std::time::Duration) {
        let _ = tokio::time::timeout(within, &mut self.task).await;
    }

    /// Binds `socket` (before the VMM starts, which connects to it) and relays what arrives
    /// into `log`, capped at `cap` bytes per file.
    pub(crate) fn start(socket: &Path, log: &Path, cap: u64) -> Result<ConsoleRelay> {
        let listener = UnixListener::bind(socket)
            .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
        let log = log.to_owned();
        let task = tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut file = Capped::new(log, cap);
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Err(e) = file.write(&buf[..n]) {
                    log::warn!("console log: {e}; dropping guest output");
                }
            }
        });
        Ok(ConsoleRelay { task })
    }
}

/// `console.log` plus one rotated predecessor.
struct Capped {
    path: PathBuf,
    cap: u64,
    file: Option<std::fs::File>,
    written: u64,
}

impl Capped {
    fn new(path: PathBuf, cap: u64) -> Capped {
        Capped {
            path,
            cap,
            file: None,
            written: 0,
        }
    }

    fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.file.is_none() || self.written >= self.cap {
                self.rotate()?;
            }
            let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
            let (now, later) = data.split_at(data.len().min(room));
            if let Some(f) = self.file.as_mut() {
                f.write_all(now)
                    .map_err(|e| Error::io(format!("write {}", self.path.display()), e))?;
            }
            self.written += now.len() as u64;
            data = later;
        }
        Ok(())
    }

    /// Moves a full file aside (the first time: truncates what is there) and opens a new one.
    fn rotate(&mut self) -> Result<()> {
        if self.file.take().is_some() {
            let old = self.path.with_extension("log.1");
            std::fs::rename(&self.path, &old)
                .map_err(|e| Error::io(format!("rotate {}", self.path.display()), e))?;
        }
        self.file = Some(private_file(&self.path)?);
        self.written = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_console_is_capped_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let relay = ConsoleRelay::start(&sock, &log, 1000).unwrap();
        let mut guest = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        guest.write_all(text.as_bytes()).await.unwrap();
        drop(guest);
        for _ in 0..200 {
            if relay.task.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(relay.task.is_finished(), "the relay ends with the console");
        let newest = std::fs::read_to_string(&log).unwrap();
        let older = std::fs::read_to_string(dir.path().join("console.log.1")).unwrap();
        assert!(
            newest.len() <= 1000 && older.len() == 1000,
            "{} {}",
            newest.len(),
            older.len()
        );
        assert!(newest.ends_with("line 1999\n"), "{newest}");
        assert_eq!(
            format!("{older}{newest}"),
            text[text.len() - older.len() - newest.len()..]
        );
        assert_eq!(crate::tail_lines(&log, 1), "line 1999");
    }
}
