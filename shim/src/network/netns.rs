//! Running netlink work inside a pod's network namespace. `setns` moves only the calling
//! thread, so the work gets a thread of its own (with a one-thread runtime for rtnetlink) and
//! the shim's runtime threads never change namespace. Sockets and taps opened there stay in
//! that namespace whatever thread uses them later.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

use crate::{Error, Result};

/// Runs `f` on a fresh thread named `name` that joined the network namespace at `netns`.
fn on_thread_in<T, F>(netns: &Path, name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let file = File::open(netns).map_err(|e| Error::Netns {
        path: netns.to_owned(),
        message: e.to_string(),
    })?;
    let path: PathBuf = netns.to_owned();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns {
                path,
                message: format!("not a network namespace, or no right to join it ({e})"),
            })?;
            f()
        })
        .map_err(|e| Error::io("spawn the netns thread", e))?;
    thread
        .join()
        .unwrap_or_else(|_| Err(Error::Network("the netns thread panicked".into())))
}

/// Runs `work` on a fresh thread inside the network namespace at `netns`.
pub fn run_in<T, F, Fut>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    on_thread_in(netns, "pod-netns", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("a runtime for netlink", e))?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| Error::io("open a netlink socket in the pod netns", e))?;
            let conn = tokio::spawn(conn);
            let r = work(handle).await;
            conn.abort();
            r
        })
    })
}

/// Binds a TCP listener on 127.0.0.1:`port` inside the network namespace at `netns`, for each
/// port; a failure to enter the netns fails all of them.
pub fn bind_loopback(
    netns: &Path,
    ports: Vec<u16>,
) -> Result<Vec<(u16, std::io::Result<std::net::TcpListener>)>> {
    on_thread_in(netns, "pod-netns-bind", move || {
        Ok(ports
            .into_iter()
            .map(|p| {
                let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, p))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l));
                (p, l)
            })
            .collect())
    })
}

/// A UDP socket in the network namespace at `netns`, bound to an ephemeral port there.
pub fn udp_socket(netns: &Path) -> Result<std::net::UdpSocket> {
    on_thread_in(netns, "pod-netns-udp", || {
        let s = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
            .map_err(|e| Error::io("bind a UDP socket in the pod netns", e))?;
        s.set_nonblocking(true)
            .map_err(|e| Error::io("make the UDP socket non-blocking", e))?;
        Ok(s)
    })
}

/// A TCP connection to `to` made inside the network namespace at `netns`.
pub fn tcp_connect(netns: &Path, to: std::net::SocketAddr) -> Result<std::net::TcpStream> {
    on_thread_in(netns, "pod-netns-tcp", move || {
        let s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))
            .map_err(|e| Error::io(format!("connect to {to} in the pod netns"), e))?;
        s.set_nonblocking(true)
            .map_err(|e| Error::io("make the TCP stream non-blocking", e))?;
        Ok(s)
    })
}

/// Whether something in the network namespace at `netns` listens on UDP `addr` (the kernel's
/// `/proc/net/udp` as a thread in that namespace sees it).
pub fn udp_listener_on(netns: &Path, addr: std::net::Ipv4Addr) -> Result<bool> {
    // /proc/net/udp writes an IPv4 address as the 32-bit value in host order: 127.0.0.11 is
    // 0B00007F on x86.
    let want = format!("{:08X}:", u32::from_le_bytes(addr.octets()));
    on_thread_in(netns, "pod-netns-scan", move || {
        let table = std::fs::read_to_string("/proc/thread-self/net/udp")
            .map_err(|e| Error::io("read /proc/thread-self/net/udp", e))?;
        Ok(table.lines().skip(1).any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.starts_with(&want))
        }))
    })
}
