//! Reaching the guest agent once the VM runs: wait for it to listen, connect, and give up with
//! the console tail when the VM dies or stays silent.
//!
//! This works through the [`Vmm`] trait only, so every backend gets the same retry policy and
//! the same errors; the backends just say where the vsock endpoint is and whether they exited.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::daemon::tail_lines;
use crate::error::{Error, Result};
use crate::serial::SerialLink;
use crate::vsock::{connect_once, Backoff, BoxedStream, VsockEndpoint, VsockTransport};
use crate::Vmm;

/// Longest wait for one connection attempt's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

fn unreachable(vm: &dyn Vmm, waited: Duration) -> Error {
    Error::AgentUnreachable {
        waited,
        console_tail: tail_lines(&vm.console_log(), 20),
    }
}

/// Waits for the guest to announce itself by connecting to host port `ready_port` over hybrid
/// vsock (vhost-device-vsock forwards guest connections to `<uds>_<port>`).
///
/// Knocking with `CONNECT` before the guest's vsock driver is up is not only wasted: with
/// vhost-device-vsock 0.3 a storm of early attempts can leave later ones unanswered for good
/// (seen here: the agent listening while every CONNECT for 28 s went unanswered). So in hybrid
/// mode the host stays silent until the guest says it listens.
async fn wait_for_ready(
    vm: &mut dyn Vmm,
    uds: &Path,
    ready_port: u32,
    timeout: Duration,
) -> Result<()> {
    let start = tokio::time::Instant::now();
    let path = PathBuf::from(format!("{}_{ready_port}", uds.display()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
    // The vsock daemon connects here for the guest: it may run as the unprivileged owner of
    // the socket's directory (`qemu/vsockd.rs`), which must be able to.
    if let Some(owner) = path.parent().and_then(|d| std::fs::metadata(d).ok()) {
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).map_err(|e| {
            Error::io(
                format!("hand {} to its directory's owner", path.display()),
                e,
            )
        })?;
    }
    let result = watching(vm, start, timeout, async {
        loop {
            match listener.accept().await {
                Ok((mut s, _)) => {
                    let mut b = [0u8; 16];
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        tokio::io::AsyncReadExt::read(&mut s, &mut b),
                    )
                    .await;
                    return;
                }
                // Yield before trying again, so that the watch can end the wait.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    drop(listener);
    let _ = std::fs::remove_file(&path);
    result
}

/// Waits for the guest's ready stream on the serial channel (`serial.rs`), watching the VMM.
async fn wait_for_serial(vm: &mut dyn Vmm, link: &SerialLink, timeout: Duration) -> Result<()> {
    let start = tokio::time::Instant::now();
    let Err(ended) = watching(vm, start, timeout, link.wait_ready()).await? else {
        return Ok(());
    };
    // The session ended: the VMM is going; say why if it shows in time.
    let t = tokio::time::Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        if let Some(exit) = vm.exit_error() {
            return Err(exit);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(ended)
}

/// Runs `fut` while watching the VMM every 50 ms: its exit, or `timeout` counted from
/// `start`, ends the wait with the error that says why.
async fn watching<T>(
    vm: &mut dyn Vmm,
    start: tokio::time::Instant,
    timeout: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::pin!(fut);
    loop {
        if let Some(e) = vm.exit_error() {
            return Err(e);
        }
        if start.elapsed() >= timeout {
            return Err(unreachable(vm, timeout));
        }
        if let Ok(v) = tokio::time::timeout(Duration::from_millis(50), &mut fut).await {
            return Ok(v);
        }
    }
}

/// Connects to guest port `port`: retrying until the guest listens, the VM dies or `timeout`
/// passes. With hybrid vsock and a `ready_port`, first waits for the guest's ready call.
/// A dead or silent guest yields an error carrying the console tail.
pub async fn connect_guest(
    vm: &mut dyn Vmm,
    port: u32,
    ready_port: Option<u32>,
    timeout: Duration,
) -> Result<BoxedStream> {
    let start = tokio::time::Instant::now();
    let ep: VsockEndpoint = vm.agent_endpoint().clone();
    match (&ep.transport, ready_port) {
        (VsockTransport::Hybrid(uds), Some(rp)) => wait_for_ready(vm, uds, rp, timeout).await?,
        (VsockTransport::Serial(link), Some(_)) => wait_for_serial(vm, link, timeout).await?,
        _ => {}
    }
    let mut backoff = Backoff::default();
    loop {
        if let Some(e) = vm.exit_error() {
            return Err(e);
        }
        // Bound each attempt, not just the whole: a CONNECT that reaches the guest before its
        // vsock driver is up can be lost, and its reply then never comes.
        let left = timeout.saturating_sub(start.elapsed()).min(ATTEMPT_TIMEOUT);
        match tokio::time::timeout(left, connect_once(&ep, port)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => log::trace!("guest port {port} not ready: {e}"),
            Err(_) => {
                log::debug!("guest port {port}: no answer to CONNECT within {left:?}; retrying")
            }
        }
        if start.elapsed() >= timeout {
            return Err(unreachable(vm, timeout));
        }
        if let Some(d) = backoff.next() {
            tokio::time::sleep(d).await;
        }
    }
}
