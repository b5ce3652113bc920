//! The guest's serial console, written to `console.log` with a size cap.
//!
//! The guest decides how much it prints, and the run dir lives on a tmpfs (`/run`): a console
//! written straight to a file by the VMM grows without bound. Instead QEMU's serial port is a
//! socket chardev that connects to this relay, which writes `console.log` and, once it holds
//! [`CONSOLE_CAP`] bytes, moves it to `console.log.1` (replacing the older one) and starts a
//! new one: at most two caps on disk, and the newest output is always in `console.log`, where
//! the error paths read their tail. If the relay is gone (the shim died), QEMU drops the
//! output rather than stalling the guest.
//!
//! Cloud Hypervisor has no client-mode socket: its serial `Socket` mode listens itself (bound
//! at `vm.boot`, output buffered until a client comes, non-blocking towards it), so for CH the
//! relay is the client ([`ConsoleRelay::connect`]); the file and its cap are the same.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
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
            if let Ok((stream, _)) = listener.accept().await {
                relay(stream, log, cap).await;
            }
        });
        Ok(ConsoleRelay { task })
    }

    /// Connects to the socket a VMM listens on (Cloud Hypervisor's serial `Socket` mode),
    /// retrying while it does not exist yet for at most `within`, and relays as [`Self::start`].
    pub(crate) fn connect(
        socket: &Path,
        log: &Path,
        cap: u64,
        within: std::time::Duration,
    ) -> ConsoleRelay {
        let (socket, log) = (socket.to_owned(), log.to_owned());
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match UnixStream::connect(&socket).await {
                    Ok(stream) => return relay(stream, log, cap).await,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        log::warn!(
                            "console {}: {e}; the guest's console is not recorded",
                            socket.display()
                        );
                        return;
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
        ConsoleRelay { task }
    }
}

/// Copies the console stream into the capped file until the VMM closes it.
async fn relay(mut stream: UnixStream, log: PathBuf, cap: u64) {
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
        assert_capped(relay, dir.path(), &text).await;
    }

    /// Cloud Hypervisor's side: the VMM listens (and only after a while, as CH binds at
    /// `vm.boot`), the relay connects, and the same cap holds.
    #[tokio::test]
    async fn a_console_the_vmm_serves_is_capped_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let relay = ConsoleRelay::connect(&sock, &log, 1000, std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let vmm = tokio::net::UnixListener::bind(&sock).unwrap();
        let (mut guest, _) = vmm.accept().await.unwrap();
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        guest.write_all(text.as_bytes()).await.unwrap();
        drop(guest);
        assert_capped(relay, dir.path(), &text).await;
    }

    #[tokio::test]
    async fn a_console_that_never_appears_ends_the_relay() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = ConsoleRelay::connect(
            &dir.path().join("none.sock"),
            &dir.path().join("console.log"),
            1000,
            std::time::Duration::from_millis(50),
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut relay.task)
            .await
            .expect("the relay gives up")
            .unwrap();
    }

    async fn assert_capped(relay: ConsoleRelay, dir: &Path, text: &str) {
        let log = dir.join("console.log");
        for _ in 0..200 {
            if relay.task.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(relay.task.is_finished(), "the relay ends with the console");
        let newest = std::fs::read_to_string(&log).unwrap();
        let older = std::fs::read_to_string(dir.join("console.log.1")).unwrap();
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
