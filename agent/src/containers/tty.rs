//! Terminal processes: libcontainer hands the pty master to the agent over a console socket;
//! two relay threads copy host stdin → master and master → host stdout, and TtyWinResize sets
//! the master's window size.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::host_stream::HostStream;
use cocoon_protocol::ProcessRef;
use tokio::sync::oneshot;

use super::Relays;
use super::{dup, failed, Failure, Manager, Res};
use crate::stdio::into_blocking_fd;

/// Console sockets for terminal processes.
const TTY_DIR: &str = "/run/cocoon/tty";

/// Names the console sockets. A socket path must fit `sun_path` (108 bytes), and CRI ids are
/// 64 characters each, so the name is a number, not the ids (the log line says whose it is).
static NEXT_SOCKET: AtomicU64 = AtomicU64::new(0);

impl Manager {
    pub fn resize(&self, p: &ProcessRef, rows: u32, cols: u32) -> Res<()> {
        let proc = self.process(p)?;
        let master = proc
            .tty
            .as_ref()
            .ok_or_else(|| Failure::Invalid(format!("process {} has no terminal", proc.pid)))?;
        let ws = rustix::termios::Winsize {
            ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
            ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(master, ws)
            .map_err(|e| Failure::Failed(format!("resize: {e}")))
    }
}

/// The socket the runner passes to libcontainer as `--console-socket`.
#[derive(Debug)]
pub(super) struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Binds `<TTY_DIR>/<n>.sock` for the process `who`, replacing a stale one.
    pub(super) fn bind(who: &str) -> Res<ConsoleSocket> {
        Self::bind_in(Path::new(TTY_DIR), who)
    }

    fn bind_in(dir: &Path, who: &str) -> Res<ConsoleSocket> {
        std::fs::create_dir_all(dir).map_err(failed("create the tty dir"))?;
        let n = NEXT_SOCKET.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(failed("bind the console socket"))?;
        log::debug!("{who}: console socket {}", path.display());
        Ok(ConsoleSocket { listener, path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Once the runner has exited (so libcontainer has sent the pty master): takes the master
    /// and starts the relays between it and the host's streams.
    pub(super) fn attach(
        self,
        stdin: Option<HostStream>,
        stdout: Option<HostStream>,
    ) -> Res<Relays> {
        self.listener
            .set_nonblocking(false)
            .map_err(failed("console socket"))?;
        let (conn, _) = self
            .listener
            .accept()
            .map_err(failed("accept on the console socket"))?;
        let master = recv_master(&conn).map_err(failed("receive the pty master"))?;
        relay_terminal(master, stdin, stdout)
    }
}

/// Starts the relays between a pty `master` and the host's streams.
pub(super) fn relay_terminal(
    master: OwnedFd,
    stdin: Option<HostStream>,
    stdout: Option<HostStream>,
) -> Res<Relays> {
    {
        let mut relays = Relays::default();
        if let Some(s) = stdout {
            let (tx, rx) = oneshot::channel();
            let out = File::from(into_blocking_fd(s).map_err(failed("stdout stream"))?);
            relay_thread("tty-out", File::from(dup(&master)?), out, Some(tx));
            relays.output_done = Some(rx);
        }
        if let Some(s) = stdin {
            let fd = into_blocking_fd(s).map_err(failed("stdin stream"))?;
            relays.stdin = Some(dup(&fd)?);
            relay_thread("tty-in", File::from(fd), File::from(dup(&master)?), None);
        }
        relays.tty = Some(master);
        Ok(relays)
    }
}

/// The socket file goes with the listener, also when the runner failed and nothing connected.
impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives the pty master libcontainer sends over the console socket.
fn recv_master(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut buf = [0u8; 4096];
    rustix::net::recvmsg(
        sock,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut anc,
        RecvFlags::empty(),
    )?;
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(std::io::Error::other(
        "no pty master received on the console socket",
    ))
}

/// Copies until EOF or error on a plain thread (pty and sockets in blocking mode); `done` fires
/// when the copy ends, so the exit status can wait for the output to drain.
fn relay_thread(name: &str, mut from: File, mut to: File, done: Option<oneshot::Sender<()>>) {
    let name = name.to_owned();
    let spawned = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let r = std::io::copy(&mut from, &mut to);
            log::debug!("relay ended: {r:?}");
            if let Some(d) = done {
                let _ = d.send(());
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the {name} relay: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_sun_path_for_cri_ids_and_go_with_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let cri_id = "f".repeat(64);
        let s = ConsoleSocket::bind_in(d.path(), &format!("{cri_id}/{cri_id}")).unwrap();
        let path = s.path().to_owned();
        assert!(path.exists());
        // The guest's own directory is what counts: `<TTY_DIR>/<n>.sock` stays far below 108.
        let in_guest = Path::new(TTY_DIR).join(path.file_name().unwrap());
        assert!(in_guest.as_os_str().len() < 40, "{}", in_guest.display());
        let other = ConsoleSocket::bind_in(d.path(), "c/e").unwrap();
        assert_ne!(other.path(), path);
        drop(s);
        assert!(!path.exists(), "the socket file is left behind");
    }
}
