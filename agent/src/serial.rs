//! The agent's channel over virtio-serial: one port (`cocoon_protocol::SERIAL_PORT_NAME`) that
//! carries a yamux session, each stream of which is one connection to one of the agent's
//! ports, as vsock would carry it.
//!
//! Why: vsock without the kernel's vhost-vsock is a vhost-user device, whose backend maps the
//! guest's RAM, so that RAM must be shared memory. virtio-serial is QEMU's own device: a pod
//! that has no other vhost-user device can then map its template's RAM copy-on-write.
//!
//! The host opens every stream and writes the port's number first ([`read_port`]); the rest is
//! what a vsock connection to that port carries (the key first, `auth.rs`). The guest opens
//! one stream of its own, to `READY_PORT`, once the API listens: the host waits for it as it
//! waits for the vsock ready call. A port has one host connection at a time; when it closes
//! (the shim went, or a template is being saved) the session ends, and a new one starts when
//! a host connects again, so a VM restored from a template starts with a fresh session.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use cocoon_mux::MuxStream;
use cocoon_protocol::{READY_PORT, SERIAL_PORT_NAME};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;

use crate::auth::Gate;
use crate::host_stream::HostStream;

/// Whether the host chose the serial channel for this VM (kernel command line).
pub fn wanted() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .any(|w| w == cocoon_protocol::SERIAL_CHANNEL_ARG)
}

/// How often the agent looks for its port while the driver brings it up, and for a host
/// while none is connected: the port can't be waited on (it polls readable and hung up while
/// the host is away).
const POLL: Duration = Duration::from_millis(5);

/// How long a stream may take to name its port.
const HEADER_WAIT: Duration = Duration::from_secs(10);

/// The device node of the port named [`SERIAL_PORT_NAME`], once the driver shows it.
async fn find_port() -> PathBuf {
    let mut waited = Duration::ZERO;
    loop {
        if let Some(dev) = port_device(Path::new("/sys/class/virtio-ports")) {
            return dev;
        }
        if waited == Duration::from_secs(5) {
            log::warn!("still no virtio-serial port {SERIAL_PORT_NAME} after 5 s");
        }
        tokio::time::sleep(POLL).await;
        waited += POLL;
    }
}

fn port_device(class: &Path) -> Option<PathBuf> {
    std::fs::read_dir(class).ok()?.flatten().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == SERIAL_PORT_NAME).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Whether a host has the port's other end open: only then is the port writable.
fn host_connected(port: &std::fs::File) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(port, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok()
        && fds[0].revents().contains(PollFlags::OUT)
        && !fds[0].revents().contains(PollFlags::HUP)
}

/// Serves the channel for as long as the guest runs: one session per host connection. `ready`
/// turns true once the API listens (and, in a template guest, once it was restored).
pub async fn serve(gate: Arc<Gate>, ready: watch::Receiver<bool>) {
    let dev = find_port().await;
    let port = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&dev)
    {
        Ok(f) => f,
        Err(e) => {
            log::error!("open {}: {e}; no host can reach the agent", dev.display());
            return;
        }
    };
    log::debug!("agent channel on {}", dev.display());
    loop {
        while !host_connected(&port) {
            tokio::time::sleep(POLL).await;
        }
        match session(&port, &gate, ready.clone()).await {
            Ok(()) => log::debug!("the host closed the agent channel"),
            Err(e) => log::warn!("agent channel: {e}"),
        }
    }
}

/// One host connection's session, until the host closes its end.
async fn session(
    port: &std::fs::File,
    gate: &Arc<Gate>,
    mut ready: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (opener, mut inbound) = cocoon_mux::start(PortIo::new(port)?, cocoon_mux::Mode::Server);
    let announce = tokio::spawn(async move {
        let _ = ready.wait_for(|r| *r).await;
        match opener.open().await {
            Ok(mut s) => {
                let _ = s.write_all(&READY_PORT.to_le_bytes()).await;
                let _ = s.shutdown().await;
                log::debug!("announced readiness to the host");
            }
            Err(e) => log::warn!("announce readiness: {e}"),
        }
    });
    while let Some(stream) = inbound.recv().await {
        let gate = gate.clone();
        tokio::spawn(async move {
            if let Err(e) = admit(stream, &gate).await {
                log::warn!("agent channel stream: {e}");
            }
        });
    }
    announce.abort();
    Ok(())
}

/// The port as a byte stream, on tokio's pipe types (which take any pollable fd) but not
/// their `AsyncRead`/`AsyncWrite`: a read of the port returns one buffer of the device's queue
/// at a time and a write takes at most 32 KiB, and tokio takes a short read or write for a
/// drained or full fd under epoll and waits for a wake-up that then never comes. Here
/// readiness is cleared only by a read or write that would block (`try_read`, `try_write`).
#[derive(Debug)]
struct PortIo {
    rx: pipe::Receiver,
    tx: pipe::Sender,
}

impl PortIo {
    fn new(port: &std::fs::File) -> std::io::Result<PortIo> {
        Ok(PortIo {
            rx: pipe::Receiver::from_file_unchecked(port.try_clone()?)?,
            tx: pipe::Sender::from_file_unchecked(port.try_clone()?)?,
        })
    }
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            ready!(self.rx.poll_read_ready(cx))?;
            match self.rx.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.tx.poll_write_ready(cx))?;
            match self.tx.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The port a new stream is for: its first four bytes, little-endian.
async fn read_port(stream: &mut MuxStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    tokio::time::timeout(HEADER_WAIT, stream.read_exact(&mut b))
        .await
        .map_err(|_| std::io::Error::other("no port named in time"))??;
    Ok(u32::from_le_bytes(b))
}

/// Hands a stream to its port's listener, which checks its key as for any connection.
async fn admit(mut stream: MuxStream, gate: &Arc<Gate>) -> std::io::Result<()> {
    let port = read_port(&mut stream).await?;
    if !gate.offer(port, HostStream::Mux(stream)) {
        return Err(std::io::Error::other(format!(
            "nothing listens on port {port}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_found_by_its_name() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(port_device(d.path()), None);
        for (dev, name) in [("vport0p0", "other"), ("vport1p1", SERIAL_PORT_NAME)] {
            std::fs::create_dir(d.path().join(dev)).unwrap();
            std::fs::write(d.path().join(dev).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(port_device(d.path()), Some(PathBuf::from("/dev/vport1p1")));
    }
}
