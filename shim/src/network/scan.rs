//! What the pod's network namespace holds after CNI ran: the interfaces with an address, their
//! routes and permanent neighbours, read over netlink and put in the agent's terms.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cocoon_protocol::agent as ag;
use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{Error, Result};

/// One interface of the pod netns that gets a guest NIC.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInterface {
    pub index: u32,
    pub iface: ag::Interface,
}

/// The pod netns's network, in the agent's terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    pub interfaces: Vec<PodInterface>,
    /// Link routes (no gateway) first, so that gateways are reachable when the rest is added.
    pub routes: Vec<ag::Route>,
    pub neighbours: Vec<ag::Neighbour>,
}

fn nl(what: &str) -> impl Fn(rtnetlink::Error) -> Error + '_ {
    move |e| Error::Network(format!("{what}: {e}"))
}

pub fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Addresses the guest must not copy: IPv6 link-local ones it makes itself.
fn copied(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// Reads the namespace: every non-loopback interface with an address, the main table's routes
/// through them (those the kernel made from an address come back by themselves in the guest),
/// and their permanent neighbours.
pub async fn scan(h: &Handle) -> Result<Scan> {
    let mut links: HashMap<u32, ag::Interface> = HashMap::new();
    let mut stream = h.link().get().execute();
    while let Some(l) = stream.try_next().await.map_err(nl("listing interfaces"))? {
        if l.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let mut iface = ag::Interface::new();
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => iface.name = n.clone(),
                LinkAttribute::Address(m) => iface.hw_addr = mac_string(m),
                LinkAttribute::Mtu(m) => iface.mtu = *m,
                _ => {}
            }
        }
        links.insert(l.header.index, iface);
    }
    let mut stream = h.address().get().execute();
    while let Some(a) = stream.try_next().await.map_err(nl("listing addresses"))? {
        let Some(iface) = links.get_mut(&a.header.index) else {
            continue;
        };
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip.filter(copied) {
            iface.addresses.push(ag::IpAddress {
                address: ip.to_string(),
                prefix_len: u32::from(a.header.prefix_len),
                ..Default::default()
            });
        }
    }
    let mut interfaces: Vec<PodInterface> = links
        .into_iter()
        .filter(|(_, i)| !i.addresses.is_empty())
        .map(|(index, iface)| PodInterface { index, iface })
        .collect();
    interfaces.sort_by_key(|i| i.index);
    let name_of = |index: u32| {
        interfaces
            .iter()
            .find(|i| i.index == index)
            .map(|i| i.iface.name.clone())
    };

    let mut routes = vec![];
    let queries = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for q in queries {
        let mut stream = h.route().get(q).execute();
        while let Some(r) = stream.try_next().await.map_err(nl("listing routes"))? {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table != 254 || r.header.protocol == RouteProtocol::Kernel {
                continue;
            }
            let mut route = ag::Route::new();
            let mut device = None;
            let mut dest = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => device = name_of(*i),
                    RouteAttribute::Destination(d) => dest = ip_of(d),
                    RouteAttribute::Gateway(g) => {
                        route.gateway = ip_of(g).map(|g| g.to_string()).unwrap_or_default()
                    }
                    RouteAttribute::PrefSource(s) => {
                        route.source = ip_of(s).map(|s| s.to_string()).unwrap_or_default()
                    }
                    _ => {}
                }
            }
            let Some(device) = device else { continue };
            if dest.as_ref().is_some_and(|d| !copied(d)) {
                continue;
            }
            route.device = device;
            route.dest = dest
                .map(|d| format!("{d}/{}", r.header.destination_prefix_length))
                .unwrap_or_default();
            route.scope = u32::from(u8::from(r.header.scope));
            if r.header.scope != RouteScope::Universe && r.header.scope != RouteScope::Link {
                continue;
            }
            routes.push(route);
        }
    }
    routes.sort_by_key(|r| !r.gateway.is_empty());

    let mut neighbours = vec![];
    let mut stream = h.neighbours().get().execute();
    while let Some(n) = stream.try_next().await.map_err(nl("listing neighbours"))? {
        if n.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(device) = name_of(n.header.ifindex) else {
            continue;
        };
        let mut nb = ag::Neighbour::new();
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    nb.ip = v4.to_string()
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    nb.ip = v6.to_string()
                }
                NeighbourAttribute::LinkLayerAddress(m) => nb.hw_addr = mac_string(m),
                _ => {}
            }
        }
        if !nb.ip.is_empty() && !nb.hw_addr.is_empty() {
            nb.device = device;
            neighbours.push(nb);
        }
    }
    Ok(Scan {
        interfaces,
        routes,
        neighbours,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_print_like_ip_link() {
        assert_eq!(
            mac_string(&[0x0a, 0x58, 0, 0xff, 1, 2]),
            "0a:58:00:ff:01:02"
        );
    }

    #[test]
    fn only_ipv6_link_local_addresses_stay_behind() {
        assert!(copied(&"10.1.2.3".parse().unwrap()));
        assert!(copied(&"fd00::2".parse().unwrap()));
        assert!(!copied(&"fe80::1".parse().unwrap()));
    }
}
