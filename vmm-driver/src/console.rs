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
//! Each line is stamped with the host's wall-clock time (RFC 3339, UTC) as it arrives: the
//! guest's own stamps count uptime, which for a pod restored from a VM template goes on from
//! the template's boot. The agent's lines at the config's `agent_log_in_shim` level or above
//! also go to the shim's log ([`Forward`]), so they reach containerd's.
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

/// A line the guest has not ended after this many bytes is written as one anyway.
const LONGEST_LINE: usize = 4096;

/// Where the console goes.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub log: PathBuf,
    /// The most one file holds ([`CONSOLE_CAP`]).
    pub cap: u64,
    pub forward: Forward,
}

/// Which of the agent's lines also go to the host's log, and as whose.
#[derive(Debug, Clone)]
pub(crate) struct Forward {
    /// Names the VM in the host's log.
    pub label: String,
    pub level: log::LevelFilter,
}

impl Output {
    /// The console of the VM `label`, into `log`, capped, forwarding as `cfg` says.
    pub(crate) fn new(log: PathBuf, label: &str, cfg: &crate::Config) -> Output {
        Output {
            log,
            cap: CONSOLE_CAP,
            forward: Forward {
                label: label.to_owned(),
                level: cfg.agent_log_filter(),
            },
        }
    }
}

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
    /// into `out`.
    pub(crate) fn start(socket: &Path, out: Output) -> Result<ConsoleRelay> {
        let listener = UnixListener::bind(socket)
            .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
        let task = tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                relay(stream, out).await;
            }
        });
        Ok(ConsoleRelay { task })
    }

    /// Connects to the socket a VMM listens on (Cloud Hypervisor's serial `Socket` mode),
    /// retrying while it does not exist yet for at most `within`, and relays as [`Self::start`].
    pub(crate) fn connect(socket: &Path, out: Output, within: std::time::Duration) -> ConsoleRelay {
        let socket = socket.to_owned();
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match UnixStream::connect(&socket).await {
                    Ok(stream) => return relay(stream, out).await,
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

/// Copies the console stream into the capped file, line by line, until the VMM closes it.
async fn relay(mut stream: UnixStream, out: Output) {
    let mut lines = Lines::new(Capped::new(out.log, out.cap), out.forward);
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        lines.push(&buf[..n]);
    }
    lines.finish();
}

/// Splits the console into lines, stamps them and forwards the agent's.
struct Lines {
    file: Capped,
    forward: Forward,
    /// The start of a line not ended yet, and when its first byte came.
    partial: Vec<u8>,
    partial_at: std::time::SystemTime,
}

impl Lines {
    fn new(file: Capped, forward: Forward) -> Lines {
        Lines {
            file,
            forward,
            partial: Vec::new(),
            partial_at: std::time::SystemTime::now(),
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.partial.is_empty() {
                self.partial_at = std::time::SystemTime::now();
            }
            let room = LONGEST_LINE.saturating_sub(self.partial.len()).max(1);
            let window = &data[..data.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&window[..i]);
                    data = &data[i + 1..];
                    self.end_line();
                }
                None => {
                    self.partial.extend_from_slice(window);
                    data = &data[window.len()..];
                    if self.partial.len() >= LONGEST_LINE {
                        self.end_line();
                    }
                }
            }
        }
    }

    /// Writes what is left as a last line.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            self.end_line();
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.partial);
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches('\r');
        let stamp = humantime::format_rfc3339_millis(self.partial_at);
        if let Err(e) = self.file.write(format!("{stamp} {line}\n").as_bytes()) {
            log::warn!("console log: {e}; dropping guest output");
        }
        if let Some((level, msg)) = agent_line(line) {
            if level <= self.forward.level {
                log::log!(target: "guest", level, "VM {}: agent: {msg}", self.forward.label);
            }
        }
    }
}

/// The level and message of one of the agent's lines (`agent/src/logger.rs`:
/// `[uptime] cocoon-agent LEVEL: message`).
fn agent_line(line: &str) -> Option<(log::Level, &str)> {
    let rest = &line[line.find("] cocoon-agent ")? + "] cocoon-agent ".len()..];
    let (level, msg) = rest.split_once(": ")?;
    Some((level.parse().ok()?, msg))
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
        let relay = ConsoleRelay::start(&sock, output(&log)).unwrap();
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
        let relay = ConsoleRelay::connect(&sock, output(&log), std::time::Duration::from_secs(10));
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
            output(&dir.path().join("console.log")),
            std::time::Duration::from_millis(50),
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut relay.task)
            .await
            .expect("the relay gives up")
            .unwrap();
    }

    fn output(log: &Path) -> Output {
        Output {
            log: log.to_owned(),
            cap: 1000,
            forward: Forward {
                label: "test".into(),
                level: log::LevelFilter::Warn,
            },
        }
    }

    /// Each line with its stamp taken off (`<RFC 3339 time> `), checking that it has one.
    fn unstamped(text: &str) -> String {
        text.lines()
            .map(|l| {
                let (stamp, line) = l.split_once(' ').unwrap_or(("", l));
                assert!(
                    humantime::parse_rfc3339(stamp).is_ok(),
                    "{l:?} starts with a time"
                );
                format!("{line}\n")
            })
            .collect()
    }

    #[test]
    fn agent_lines_are_recognised() {
        assert_eq!(
            agent_line("[    2.171] cocoon-agent WARN: no shared directory: later"),
            Some((log::Level::Warn, "no shared directory: later"))
        );
        assert_eq!(agent_line("[    0.5] virtio: something: else"), None);
        assert_eq!(agent_line("cocoon-agent: template ready"), None);
    }

    #[tokio::test]
    async fn lines_are_stamped_and_unended_ones_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut lines = Lines::new(Capped::new(log.clone(), 1 << 20), output(&log).forward);
        lines.push(b"one\ntw");
        lines.push(b"o\r\nthree");
        lines.push(&[b'x'; LONGEST_LINE]);
        lines.push(b"four");
        lines.finish();
        let text = std::fs::read_to_string(&log).unwrap();
        let long = format!("three{}", "x".repeat(LONGEST_LINE - 5));
        assert_eq!(unstamped(&text), format!("one\ntwo\n{long}\nxxxxxfour\n"));
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
        // Rotation cuts a stamped line anywhere: compare from the first whole line on.
        let both = format!("{older}{newest}");
        let kept = unstamped(&both[both.find('\n').unwrap() + 1..]);
        assert!(kept.len() > 400, "{kept}");
        assert!(text.ends_with(&kept), "the newest output, in order: {kept}");
        assert!(crate::tail_lines(&log, 1).ends_with(" line 1999"));
    }
}
