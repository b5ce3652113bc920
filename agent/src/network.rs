//! The pod's network in the guest. The guest's own network namespace is the pod's: every
//! container joins it (`spec.rs` drops the host's netns path), so what the host's pod netns
//! has (CNI's veth: addresses, MTU, routes, neighbours) is copied here onto the NIC that
//! carries the veth's MAC, renamed to the veth's name so that `ip addr` reads as under runc.
//!
//! Netlink through `rtnetlink`; each error names the interface and the step.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cocoon_protocol::agent::{Interface, Neighbour, Route};
use futures_util::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// A failed step, for the host: it names the interface.
#[derive(Debug)]
pub struct NetError(pub String);

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, NetError>;

fn fail(what: impl std::fmt::Display, e: impl std::fmt::Display) -> NetError {
    NetError(format!("{what}: {e}"))
}

/// A netlink connection in the guest's (the pod's) network namespace.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| fail("netlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// `lo` up: containers of a pod talk over 127.0.0.1, with or without a NIC.
pub async fn loopback_up(h: &Handle) -> Result<()> {
    let lo = link_by(h, |l| name_of(l).as_deref() == Some("lo"))
        .await?
        .ok_or_else(|| NetError("no `lo` in the guest".into()))?;
    h.link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .map_err(|e| fail("interface lo: up", e))
}

fn name_of(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn mac_of(l: &LinkMessage) -> Option<Vec<u8>> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    })
}

async fn link_by(h: &Handle, pred: impl Fn(&LinkMessage) -> bool) -> Result<Option<LinkMessage>> {
    let mut links = h.link().get().execute();
    while let Some(l) = links
        .try_next()
        .await
        .map_err(|e| fail("listing interfaces", e))?
    {
        if pred(&l) {
            return Ok(Some(l));
        }
    }
    Ok(None)
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> Option<Vec<u8>> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    (bytes.len() == 6).then_some(bytes)
}

/// Configures the NIC with `iface.hw_addr`: name, MTU, addresses, up.
pub async fn update_interface(h: &Handle, iface: &Interface) -> Result<Interface> {
    let who = format!("interface {} ({})", iface.name, iface.hw_addr);
    let mac = parse_mac(&iface.hw_addr).ok_or_else(|| fail(&who, "not a MAC address"))?;
    // virtio_net is loaded by now, but a device may finish probing a moment later, and a
    // hot-plugged one (Docker's network, added after boot) first goes through pciehp.
    let mut found = None;
    for _ in 0..500 {
        found = link_by(h, |l| mac_of(l).as_deref() == Some(&mac[..])).await?;
        if found.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let link = found.ok_or_else(|| fail(&who, "no guest NIC has this MAC"))?;
    let index = link.header.index;
    // A link is renamed only while down.
    let mut set = LinkUnspec::new_with_index(index).down();
    if !iface.name.is_empty() {
        set = set.name(iface.name.clone());
    }
    if iface.mtu > 0 {
        set = set.mtu(iface.mtu);
    }
    h.link()
        .set(set.build())
        .execute()
        .await
        .map_err(|e| fail(format!("{who}: name/MTU"), e))?;
    for a in &iface.addresses {
        let ip: IpAddr = a
            .address
            .parse()
            .map_err(|e| fail(format!("{who}: address {:?}", a.address), e))?;
        let prefix = u8::try_from(a.prefix_len).unwrap_or(u8::MAX);
        h.address()
            .add(index, ip, prefix)
            .replace()
            .execute()
            .await
            .map_err(|e| fail(format!("{who}: address {ip}/{prefix}"), e))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| fail(format!("{who}: up"), e))?;
    log::info!(
        "{who}: {} address(es), mtu {}",
        iface.addresses.len(),
        iface.mtu
    );
    Ok(iface.clone())
}

async fn index_of(h: &Handle, device: &str) -> Result<u32> {
    link_by(h, |l| name_of(l).as_deref() == Some(device))
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| NetError(format!("interface {device}: not in the guest")))
}

/// Adds routes in the order given (the host puts link routes first).
pub async fn update_routes(h: &Handle, routes: &[Route]) -> Result<()> {
    for r in routes {
        let who = format!(
            "interface {}: route {} via {:?}",
            r.device,
            if r.dest.is_empty() {
                "default"
            } else {
                &r.dest
            },
            r.gateway
        );
        let index = index_of(h, &r.device).await?;
        let gateway: Option<IpAddr> = if r.gateway.is_empty() {
            None
        } else {
            Some(r.gateway.parse().map_err(|e| fail(&who, e))?)
        };
        let (dest, len): (IpAddr, u8) = if r.dest.is_empty() {
            let v6 = gateway.is_some_and(|g| g.is_ipv6());
            (
                if v6 {
                    Ipv6Addr::UNSPECIFIED.into()
                } else {
                    Ipv4Addr::UNSPECIFIED.into()
                },
                0,
            )
        } else {
            let (ip, len) = r.dest.split_once('/').unwrap_or((&r.dest, ""));
            let ip: IpAddr = ip.parse().map_err(|e| fail(&who, e))?;
            let full = if ip.is_ipv4() { 32 } else { 128 };
            (ip, len.parse().unwrap_or(full))
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dest, len)
            .map_err(|e| fail(&who, e))?
            .output_interface(index);
        if let Some(g) = gateway {
            b = b.gateway(g).map_err(|e| fail(&who, e))?;
        }
        if !r.source.is_empty() {
            let src: IpAddr = r.source.parse().map_err(|e| fail(&who, e))?;
            b = b.pref_source(src).map_err(|e| fail(&who, e))?;
        }
        let scope = if r.scope == 253 {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        h.route()
            .add(b.scope(scope).build())
            .replace()
            .execute()
            .await
            .map_err(|e| fail(&who, e))?;
    }
    Ok(())
}

/// Adds permanent neighbour entries.
pub async fn add_neighbours(h: &Handle, neighbours: &[Neighbour]) -> Result<()> {
    for n in neighbours {
        let who = format!(
            "interface {}: neighbour {} at {}",
            n.device, n.ip, n.hw_addr
        );
        let index = index_of(h, &n.device).await?;
        let ip: IpAddr = n.ip.parse().map_err(|e| fail(&who, e))?;
        let mac = parse_mac(&n.hw_addr).ok_or_else(|| fail(&who, "not a MAC address"))?;
        h.neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| fail(&who, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("0a:58:0A:e7:00:02"),
            Some(vec![0x0a, 0x58, 0x0a, 0xe7, 0, 2])
        );
        assert_eq!(parse_mac("0a:58:0a:e7:00"), None);
        assert_eq!(parse_mac("zz:58:0a:e7:00:02"), None);
    }
}
