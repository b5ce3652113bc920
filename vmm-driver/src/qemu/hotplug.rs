//! NICs added to a running QEMU: Docker wires a container's network after the task exists,
//! so the pod's VM is already up when its interface appears.
//!
//! Each NIC takes one of the free `pcie-root-port`s the command line reserved
//! (`cmdline::HOTPLUG_PORT`): `getfd` hands QEMU the tap, `netdev_add` makes a tap backend of
//! it, `device_add` plugs a virtio-net device into the port, and the guest's pciehp probes it.
//! (Disks go on a SCSI controller instead, `disks.rs`.)

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

impl QemuHotplug {
    /// Takes the next free hot-plug port's number.
    fn take_slot(&self, what: &str) -> Result<u8> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if n >= self.slots {
            return Err(Error::Qmp(format!(
                "no free slot for another {what} (the VM has room for {})",
                self.slots
            )));
        }
        Ok(n)
    }
}

#[async_trait]
impl NicHotplug for QemuHotplug {
    async fn add_nic(&self, nic: &Nic) -> Result<()> {
        let n = self.take_slot("NIC")?;
        let netdev = format!("hpnet{n}");
        // QEMU runs unprivileged by now (`-runas`) and can't open /dev/vhost-net itself: the
        // driver opens it and hands the fd over with the tap's.
        let vhost = match std::path::Path::new("/dev/vhost-net").exists() {
            true => Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/vhost-net")
                    .map_err(|e| Error::io("open /dev/vhost-net", e))?,
            ),
            false => None,
        };
        let mut qmp = self.qmp.lock().await;
        qmp.getfd(&netdev, nic.tap.as_fd()).await?;
        let mut args = json!({"type": "tap", "id": netdev, "fd": netdev, "vhost": vhost.is_some()});
        if let Some(f) = &vhost {
            let name = format!("{netdev}-vhost");
            qmp.getfd(&name, f.as_fd()).await?;
            args["vhostfd"] = json!(name);
        }
        qmp.execute("netdev_add", Some(args)).await?;
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
