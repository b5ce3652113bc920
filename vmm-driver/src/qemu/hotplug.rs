//! NICs added to a running QEMU: Docker wires a container's network after the task exists,
//! so the pod's VM is already up when its interface appears.
//!
//! Each NIC takes one of the free `pcie-root-port`s the command line reserved
//! (`cmdline::HOTPLUG_PORT`): `getfd` hands QEMU the tap, `netdev_add` makes a tap backend of
//! it, `device_add` plugs a virtio-net device into the port, and the guest's pciehp probes it.
//!
//! Read-only disks (issue #29's layer images) take ports from the same pool: `add-fd` hands
//! QEMU the image the driver opened (QEMU runs unprivileged and can't open it), `blockdev-add`
//! makes a read-only node of `/dev/fdset/<n>`, and `device_add` plugs a virtio-blk device with
//! a serial, by which the guest finds it.

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
use crate::{DiskHotplug, Nic, NicHotplug};

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

/// The longest serial a virtio-blk device carries (`VIRTIO_BLK_ID_BYTES`); QEMU 7.2 takes a
/// longer one without a word and the guest sees it cut.
pub const MAX_SERIAL: usize = 20;

/// A read-only disk plugged into the VM: its block node and its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluggedDisk {
    pub node: String,
    pub device: String,
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

    /// Plugs `image` in as a read-only virtio-blk disk with `serial` (the guest reads it at
    /// `/sys/block/vd*/serial`). `image` must be opened read-only (QEMU matches an fd set's
    /// access mode to the node's) and without `O_DIRECT`: the node reads through the host's
    /// page cache and never drops it (`drop-cache: false`), so every VM that reads one image
    /// shares one copy of it in the host's memory.
    pub async fn plug_disk(&self, image: &std::fs::File, serial: &str) -> Result<PluggedDisk> {
        let plain = serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if serial.is_empty() || serial.len() > MAX_SERIAL || !plain {
            return Err(Error::Qmp(format!(
                "disk serial {serial:?}: 1 to {MAX_SERIAL} letters, digits, '-' or '_'"
            )));
        }
        let mode = rustix::fs::fcntl_getfl(image).map_err(|e| Error::io("fcntl", e.into()))?;
        if mode & rustix::fs::OFlags::RWMODE != rustix::fs::OFlags::RDONLY
            || mode.contains(rustix::fs::OFlags::DIRECT)
        {
            return Err(Error::Qmp(format!(
                "disk {serial}: the image must be opened read-only and without O_DIRECT"
            )));
        }
        let n = self.take_slot("disk")?;
        let node = format!("hpblk{n}");
        let device = format!("hpdisk{n}");
        let mut qmp = self.qmp.lock().await;
        let fdset = qmp
            .add_fd(image.as_fd(), &format!("cocoon-disk:{serial}"))
            .await?;
        let file = json!({"driver": "file", "filename": format!("/dev/fdset/{fdset}"),
                          "drop-cache": false});
        let added = qmp
            .execute(
                "blockdev-add",
                Some(json!({"driver": "raw", "node-name": node, "read-only": true, "file": file})),
            )
            .await;
        // The node holds its own copy of the fd; the set goes when the node closes it.
        let _ = qmp
            .execute("remove-fd", Some(json!({"fdset-id": fdset})))
            .await;
        added?;
        let plugged = qmp
            .execute(
                "device_add",
                Some(json!({
                    "driver": "virtio-blk-pci",
                    "id": device,
                    "drive": node,
                    "serial": serial,
                    "bus": format!("{HOTPLUG_PORT}{n}"),
                })),
            )
            .await;
        if let Err(e) = plugged {
            let _ = qmp
                .execute("blockdev-del", Some(json!({"node-name": node})))
                .await;
            return Err(e);
        }
        log::info!("hot-plugged read-only disk {serial} on {HOTPLUG_PORT}{n}");
        Ok(PluggedDisk { node, device })
    }
}

#[async_trait]
impl DiskHotplug for QemuHotplug {
    async fn add_disk(&self, image: &std::fs::File, serial: &str) -> Result<()> {
        self.plug_disk(image, serial).await.map(drop)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A real QEMU, paused before any guest code runs (`-S`), with two hot-plug ports: what is
    /// checked is QEMU's side, the node and the device, as QMP reports them.
    #[tokio::test]
    async fn a_read_only_image_is_plugged_in_by_fd_with_its_serial() {
        let Ok(qemu) = which::which("qemu-system-x86_64") else {
            eprintln!("SKIPPED a_read_only_image_is_plugged_in_by_fd_with_its_serial: no QEMU");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let image = dir.path().join("layer.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let mut child = tokio::process::Command::new(qemu)
            .args([
                "-S",
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1"])
            .args(["-device", "pcie-root-port,id=hp1,bus=pcie.0,chassis=2"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let qmp = loop {
            match Qmp::connect(&sock, Duration::from_secs(10)).await {
                Ok(q) => break q,
                Err(e) if t0.elapsed() > Duration::from_secs(20) => panic!("QMP: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let h = QemuHotplug::new(Arc::new(Mutex::new(qmp)), 2);

        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let e = h.plug_disk(&rw, "layer-a").await.unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        let ro = std::fs::File::open(&image).unwrap();
        let e = h
            .plug_disk(&ro, "a-serial-over-20-bytes")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("serial"), "{e}");

        let disk = h.plug_disk(&ro, "layer-a").await.unwrap();
        drop(ro); // QEMU holds its own copy.
        let mut q = h.qmp.lock().await;
        let nodes = q.execute("query-named-block-nodes", None).await.unwrap();
        let node = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == disk.node.as_str())
            .unwrap_or_else(|| panic!("no node {}: {nodes}", disk.node));
        assert_eq!(node["ro"], true, "{node}");
        let serial = q
            .execute(
                "qom-get",
                Some(
                    json!({"path": format!("/machine/peripheral/{}", disk.device),
                            "property": "serial"}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(serial, "layer-a");
        drop(q);
        // The slots are the NICs' too: one left, then none.
        let second = std::fs::File::open(&image).unwrap();
        h.plug_disk(&second, "layer-b").await.unwrap();
        let e = h
            .plug_disk(&second, "layer-c")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no free slot"), "{e}");
        let _ = h.qmp.lock().await.quit().await;
        let _ = child.wait().await;
    }
}
