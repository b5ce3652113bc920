//! NICs added to a running QEMU: Docker wires a container's network after the task exists,
//! so the pod's VM is already up when its interface appears.
//!
//! Each NIC takes one of the free `pcie-root-port`s the command line reserved
//! (`cmdline::HOTPLUG_PORT`): `getfd` hands QEMU the tap, `netdev_add` makes a tap backend of
//! it, `device_add` plugs a virtio-net device into the port, and the guest's pciehp probes it.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::cmdline::HOTPLUG_PORT;
use super::qmp::Qmp;
use crate::error::{Error, Result};
use crate::{Nic, NicHotplug};

/// Hot-plugs NICs into one QEMU through its QMP session.
#[derive(Debug)]
pub struct QemuHotplug {
    qmp: Arc<Mutex<Qmp<UnixStream>>>,
    slots: u8,
    next: AtomicU8,
}

impl QemuHotplug {
    pub fn new(qmp: Arc<Mutex<Qmp<UnixStream>>>, slots: u8) -> QemuHotplug {
        QemuHotplug {
            qmp,
            slots,
            next: AtomicU8::new(0),
        }
    }
}

#[async_trait]
impl NicHotplug for QemuHotplug {
    async fn add_nic(&self, nic: &Nic) -> Result<()> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if n >= self.slots {
            return Err(Error::Qmp(format!(
                "no free slot for another NIC (the VM has room for {})",
                self.slots
            )));
        }
        let netdev = format!("hpnet{n}");
        let vhost = std::path::Path::new("/dev/vhost-net").exists();
        let mut qmp = self.qmp.lock().await;
        qmp.getfd(&netdev, nic.tap.as_fd()).await?;
        qmp.execute(
            "netdev_add",
            Some(json!({"type": "tap", "id": netdev, "fd": netdev, "vhost": vhost})),
        )
        .await?;
        let added = qmp
            .execute(
                "device_add",
                Some(json!({
                    "driver": "virtio-net-pci",
                    "id": format!("hpnic{n}"),
                    "netdev": netdev,
                    "mac": nic.mac,
                    "bus": format!("{HOTPLUG_PORT}{n}"),
                })),
            )
            .await;
        if let Err(e) = added {
            let _ = qmp.execute("netdev_del", Some(json!({"id": netdev}))).await;
            return Err(e);
        }
        log::info!("hot-plugged NIC {} on {HOTPLUG_PORT}{n}", nic.mac);
        Ok(())
    }
}
