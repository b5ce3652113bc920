//! The tc-redirect model, one pair per pod interface: a tap beside CNI's veth in the pod
//! netns, and an ingress qdisc on each with a match-all u32 filter whose mirred action
//! redirects every frame to the other's egress. The veth keeps the pod IP, so CNI, kubelet and
//! the host see the pod as usual; the guest NIC (carrying the veth's MAC) sends and receives
//! the frames. This works with any CNI plugin, as Kata's default model does.

use std::os::fd::{AsFd, OwnedFd};

use futures_util::TryStreamExt;
use netlink_packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};
use tun_rs::{DeviceBuilder, Layer};

use crate::{Error, Result};

/// `ETH_P_ALL`, as tc wants it: in network byte order.
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();
/// The ingress qdisc's parent handle `ffff:`, to which its filters attach.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// A tap whose frames are exchanged with a veth.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    /// The shim's copy; the VMM gets a dup. The tap is not persistent: it goes away with the
    /// last fd, so a crashed shim and its VMM leave no tap behind.
    pub fd: OwnedFd,
}

fn nl(what: String) -> impl Fn(rtnetlink::Error) -> Error {
    move |e| Error::Network(format!("{what}: {e}"))
}

/// Creates tap `name` (IFF_TAP|IFF_VNET_HDR, no packet info) with the veth's MTU, up, and the
/// two redirects between it and the veth (`veth_index`, named `veth` in errors).
pub async fn create(h: &Handle, name: &str, veth: &str, veth_index: u32, mtu: u32) -> Result<Tap> {
    let device = DeviceBuilder::new()
        .name(name)
        .layer(Layer::L2)
        .offload(true)
        .packet_information(false)
        .enable(false)
        .build_sync()
        .map_err(|e| Error::Network(format!("interface {name}: create the tap: {e}")))?;
    let fd = device
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io(format!("interface {name}: dup the tap fd"), e))?;
    drop(device);
    let index = h
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("interface {name}: look up")))?
        .map(|l| l.header.index)
        .ok_or_else(|| Error::Network(format!("interface {name}: gone right after creation")))?;
    let mut up = LinkUnspec::new_with_index(index).up();
    if mtu > 0 {
        up = up.mtu(mtu);
    }
    h.link()
        .set(up.build())
        .execute()
        .await
        .map_err(nl(format!("interface {name}: MTU {mtu} and up")))?;
    add_ingress(h, veth, veth_index).await?;
    // From here on the veth carries a qdisc of ours: a failure removes it (the tap's own
    // qdisc and filter go with the tap when `fd` is dropped).
    if let Err(e) = redirect_both(h, name, index, veth, veth_index).await {
        if let Err(undo) = remove_redirect(h, veth, veth_index).await {
            log::warn!("{undo}");
        }
        return Err(e);
    }
    Ok(Tap {
        name: name.to_owned(),
        fd,
    })
}

async fn redirect_both(
    h: &Handle,
    tap: &str,
    tap_index: u32,
    veth: &str,
    veth_index: u32,
) -> Result<()> {
    add_ingress(h, tap, tap_index).await?;
    for ((from, from_idx), to_idx) in [
        ((veth, veth_index), tap_index),
        ((tap, tap_index), veth_index),
    ] {
        h.traffic_filter(idx_i32(from_idx))
            .add()
            .parent(INGRESS_PARENT)
            .protocol(ETH_P_ALL_BE)
            .redirect(to_idx)
            .map_err(nl(format!("interface {from}: build the redirect filter")))?
            .execute()
            .await
            .map_err(nl(format!("interface {from}: add the redirect filter")))?;
    }
    Ok(())
}

async fn add_ingress(h: &Handle, dev: &str, index: u32) -> Result<()> {
    h.qdisc()
        .add(idx_i32(index))
        .ingress()
        .execute()
        .await
        .map_err(nl(format!("interface {dev}: add the ingress qdisc")))
}

fn idx_i32(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

/// Removes the ingress qdisc (and with it the redirect filter) from a veth. The tap's own go
/// with the tap.
pub async fn remove_redirect(h: &Handle, veth: &str, veth_index: u32) -> Result<()> {
    let mut del = h.qdisc().del(idx_i32(veth_index));
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
    del.execute()
        .await
        .map_err(nl(format!("interface {veth}: remove the ingress qdisc")))
}
