//! Port-forward, guest side (see `ListenPorts` in agent.proto). The host mirrors the ports
//! this module reports with listeners in the pod netns and relays each connection to
//! `FORWARD_PORT`; the agent dials the port on 127.0.0.1 here, in the guest's network
//! namespace, which is the pod's, so a server bound to 127.0.0.1 is reached exactly as
//! runc's port-forward reaches it.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::host_stream::HostStream;
use cocoon_protocol::FORWARD_PORT;
use tokio::net::TcpStream;

use crate::stdio::read_hello;

/// How often a pending `ListenPorts` rescans `/proc/net/tcp*`: the longest a new server
/// waits before port-forward reaches it.
const SCAN_EVERY: Duration = Duration::from_millis(250);
/// The longest a `ListenPorts` call is held open.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// TCP state LISTEN in `/proc/net/tcp`.
const LISTEN: &str = "0A";

/// Ports in LISTEN state on an address that 127.0.0.1 reaches: 0.0.0.0, 127.0.0.0/8, `::`
/// and `::ffff:127.x.y.z` (`/proc/net/tcp` and `tcp6` text; addresses are in the kernel's
/// byte order, which on x86 puts 127 in the last hex pair).
pub fn listening_ports(tcp: &str, tcp6: &str) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for line in tcp.lines().chain(tcp6.lines()) {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != LISTEN {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        if port != 0 && reaches_loopback(addr) {
            ports.insert(port);
        }
    }
    ports
}

fn reaches_loopback(addr: &str) -> bool {
    let v4 = |a: &str| a == "00000000" || a.ends_with("7F") || a.ends_with("7f");
    match addr.len() {
        8 => v4(addr),
        32 => {
            addr.bytes().all(|b| b == b'0')
                || (addr[..16].bytes().all(|b| b == b'0')
                    && addr[16..24].eq_ignore_ascii_case("FFFF0000")
                    && v4(&addr[24..]))
        }
        _ => false,
    }
}

/// The guest's listening ports now.
pub fn scan() -> BTreeSet<u16> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    listening_ports(&read("/proc/net/tcp"), &read("/proc/net/tcp6"))
}

/// The listening ports once they differ from `known`, or after `wait` (capped).
pub async fn wait_change(known: &BTreeSet<u16>, wait: Duration) -> BTreeSet<u16> {
    let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
    loop {
        let now = scan();
        if &now != known || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(SCAN_EVERY).await;
    }
}

/// Accepts forward connections (those with the pod's key) forever.
pub fn serve(gate: &std::sync::Arc<crate::auth::Gate>) -> std::io::Result<()> {
    let mut admitted = gate.listen(FORWARD_PORT)?;
    tokio::spawn(async move {
        while let Some(stream) = admitted.recv().await {
            tokio::spawn(relay(stream));
        }
    });
    Ok(())
}

async fn relay(mut host: HostStream) {
    let Some(line) = read_hello(&mut host).await else {
        log::warn!("forward connection without a port line; closing it");
        return;
    };
    let Some(port) = std::str::from_utf8(&line)
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
    else {
        log::warn!(
            "forward: bad port line {:?}",
            String::from_utf8_lossy(&line)
        );
        return;
    };
    let local = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            // The host sees the stream close, as a client of runc's forward sees a refusal.
            log::info!("forward to 127.0.0.1:{port}: {e}");
            return;
        }
    };
    cocoon_protocol::forward::splice(host, local).await;
    log::debug!("forward to 127.0.0.1:{port} ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 102 1 0 100 0 0 10 0
   2: 0202E70A:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 103 1 0 100 0 0 10 0
   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 104 1 0 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 105 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:0929 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 106 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1A0A 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 107 1 0 100 0 0 10 0
";

    #[test]
    fn only_listeners_that_loopback_reaches_are_reported() {
        // 8080 on 0.0.0.0, 80 on 127.0.0.1, :: 9000, ::ffff:127.0.0.1 6666; not 22 on the pod
        // IP only, not an established connection, not ::1 (a tcp4 dial never reaches it).
        let got: Vec<u16> = listening_ports(TCP, TCP6).into_iter().collect();
        assert_eq!(got, vec![80, 6666, 8080, 9000]);
        assert!(listening_ports("garbage\n1: x", "").is_empty());
    }
}
