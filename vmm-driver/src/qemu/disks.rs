//! Disks added to a running QEMU (issue #29's layer images): each is a `scsi-hd` LUN on the
//! one virtio-scsi controller every VM has from its start ([`SCSI_CONTROLLER`]).
//!
//! Why SCSI, as Kata's default `block_device_driver`: a container image has several layers
//! and a pod several containers, and a virtio-blk disk would take one PCIe root port each,
//! reserved at boot (part of a template's identity) and enumerated by the guest. A LUN needs
//! no port: thousands fit on one controller, and the guest adds one on the controller's
//! hot-plug event without any PCI work.
//!
//! `add-fd` hands QEMU the image the driver opened (QEMU runs unprivileged and can't open
//! it), `blockdev-add` makes a read-only node of `/dev/fdset/<n>`, and `device_add` plugs the
//! LUN in. The guest scans nothing by itself (`scsi_mod.scan=manual`, which spares a boot
//! the probe of 256 empty targets); the controller's event adds exactly the new LUN, which
//! therefore is never 0 (LUN 0 would ask for a scan of the whole target).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::qmp::Qmp;
use crate::error::{Error, Result};
use crate::DiskHotplug;

/// The id of the virtio-scsi controller on the command line.
pub const SCSI_CONTROLLER: &str = "scsi0";

/// The highest LUN virtio-scsi addresses (`VIRTIO_SCSI_MAX_LUN`).
const MAX_LUN: u32 = 16383;

/// Hot-plugs disks into one QEMU through its QMP session.
#[derive(Debug)]
pub struct QemuDisks {
    qmp: Arc<Mutex<Qmp<UnixStream>>>,
    /// LUNs are never reused in a VM's life: an address always means one image, so a guest
    /// that still held an old disk's mount can't mistake a new disk for it.
    next: AtomicU32,
}

impl QemuDisks {
    pub fn new(qmp: Arc<Mutex<Qmp<UnixStream>>>) -> QemuDisks {
        QemuDisks {
            qmp,
            next: AtomicU32::new(1),
        }
    }

    /// Plugs `image` in as a read-only LUN; returns the LUN. `image` must be opened
    /// read-only (QEMU matches an fd set's access mode to the node's) and without `O_DIRECT`:
    /// the node reads through the host's page cache and never drops it (`drop-cache: false`),
    /// so every VM that reads one image shares one copy of it in the host's memory.
    pub async fn plug_disk(&self, image: &std::fs::File, name: &str) -> Result<u32> {
        self.plug(image, name, false).await
    }

    /// Plugs `disk` in as a writable LUN (a container's scratch disk, which only the guest
    /// ever reads); returns the LUN. Blocks the guest discards become holes in the file; its
    /// flushes stop at the host's page cache.
    pub async fn plug_scratch(&self, disk: &std::fs::File, name: &str) -> Result<u32> {
        self.plug(disk, name, true).await
    }

    /// Plugs `file` in, refusing an fd whose access mode is not the node's or that has
    /// `O_DIRECT`.
    async fn plug(&self, file: &std::fs::File, name: &str, writable: bool) -> Result<u32> {
        use rustix::fs::OFlags;
        let mode = rustix::fs::fcntl_getfl(file).map_err(|e| Error::io("fcntl", e.into()))?;
        let (want, what, how) = match writable {
            true => (OFlags::RDWR, "a scratch disk", "read-write"),
            false => (OFlags::RDONLY, "the image", "read-only"),
        };
        if mode & OFlags::RWMODE != want || mode.contains(OFlags::DIRECT) {
            return Err(Error::Qmp(format!(
                "disk {name}: {what} must be opened {how} and without O_DIRECT"
            )));
        }
        let lun = self.next.fetch_add(1, Ordering::SeqCst);
        if lun > MAX_LUN {
            return Err(Error::Qmp(format!(
                "disk {name}: the VM has used all {MAX_LUN} disk addresses"
            )));
        }
        let (node, device) = names(lun);
        let mut qmp = self.qmp.lock().await;
        let fdset = qmp
            .add_fd(file.as_fd(), &format!("cocoon-disk:{name}"))
            .await?;
        let file = json!({"driver": "file", "filename": format!("/dev/fdset/{fdset}"),
                          "drop-cache": false});
        let mut node_args =
            json!({"driver": "raw", "node-name": node, "read-only": !writable, "file": file});
        if writable {
            node_args["discard"] = json!("unmap");
            node_args["file"]["discard"] = json!("unmap");
            // A scratch disk dies with its VM and has no name to find it by after a host
            // crash: the guest's flushes need not reach the host's disk, which would make
            // every `fsync` in a container wait for it (runc's wait; gVisor's in-memory
            // overlay has none).
            node_args["cache"] = json!({"no-flush": true});
            node_args["file"]["cache"] = json!({"no-flush": true});
        }
        let added = qmp.execute("blockdev-add", Some(node_args)).await;
        // The node holds its own copy of the fd; the set goes when the node closes it.
        let _ = qmp
            .execute("remove-fd", Some(json!({"fdset-id": fdset})))
            .await;
        added?;
        let plugged = qmp
            .execute(
                "device_add",
                Some(json!({
                    "driver": "scsi-hd",
                    "id": device,
                    "drive": node,
                    "bus": format!("{SCSI_CONTROLLER}.0"),
                    "channel": 0,
                    "scsi-id": 0,
                    "lun": lun,
                })),
            )
            .await;
        if let Err(e) = plugged {
            let _ = qmp
                .execute("blockdev-del", Some(json!({"node-name": node})))
                .await;
            return Err(e);
        }
        let kind = if writable { "scratch" } else { "read-only" };
        log::info!("hot-plugged {kind} disk {name} as LUN {lun}");
        Ok(lun)
    }

    /// Takes LUN `lun` out, device then node. A SCSI device needs no guest handshake
    /// (unlike PCIe), but QEMU lets go of its node only once the device is finalised, a
    /// moment after `device_del` returns: `blockdev-del` is retried until then.
    pub async fn unplug_disk(&self, lun: u32) -> Result<()> {
        let (node, device) = names(lun);
        let mut qmp = self.qmp.lock().await;
        qmp.execute("device_del", Some(json!({"id": device})))
            .await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match qmp
                .execute("blockdev-del", Some(json!({"node-name": node})))
                .await
            {
                Ok(_) => break,
                Err(Error::Qmp(m))
                    if m.contains("in use") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        }
        log::info!("removed disk LUN {lun}");
        Ok(())
    }
}

fn names(lun: u32) -> (String, String) {
    (format!("disk{lun}-node"), format!("disk{lun}"))
}

#[async_trait]
impl DiskHotplug for QemuDisks {
    async fn add_disk(&self, image: &std::fs::File, name: &str) -> Result<u32> {
        self.plug_disk(image, name).await
    }

    async fn add_scratch(&self, disk: &std::fs::File, name: &str) -> Result<u32> {
        self.plug_scratch(disk, name).await
    }

    async fn remove_disk(&self, lun: u32) -> Result<()> {
        self.unplug_disk(lun).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A real QEMU, paused before any guest code runs (`-S`), with the controller the command
    /// line gives every VM: what is checked is QEMU's side, the node and the device, as QMP
    /// reports them.
    #[tokio::test]
    async fn a_read_only_image_is_plugged_in_by_fd_as_a_lun_and_taken_out_again() {
        let Ok(qemu) = which::which("qemu-system-x86_64") else {
            eprintln!("SKIPPED a_read_only_image_is_plugged_in_by_fd_as_a_lun: no QEMU");
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
            .args(["-device", &format!("virtio-scsi-pci,id={SCSI_CONTROLLER}")])
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
        let h = QemuDisks::new(Arc::new(Mutex::new(qmp)));

        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let e = h.plug_disk(&rw, "layer-a").await.unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        let ro = std::fs::File::open(&image).unwrap();
        let a = h.plug_disk(&ro, "layer-a").await.unwrap();
        let b = h.plug_disk(&ro, "layer-b").await.unwrap();
        drop(ro); // QEMU holds its own copies.
        assert!(a >= 1 && b > a, "LUNs {a} then {b}: never 0, never reused");
        let mut q = h.qmp.lock().await;
        let nodes = q.execute("query-named-block-nodes", None).await.unwrap();
        let node = |n: &str| {
            nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["node-name"] == n)
                .cloned()
        };
        let (na, da) = names(a);
        let found = node(&na).unwrap_or_else(|| panic!("no node {na}: {nodes}"));
        assert_eq!(found["ro"], true, "{found}");
        let lun = q
            .execute(
                "qom-get",
                Some(json!({"path": format!("/machine/peripheral/{da}"), "property": "lun"})),
            )
            .await
            .unwrap();
        assert_eq!(lun, a);
        drop(q);

        h.unplug_disk(a).await.unwrap();
        let mut q = h.qmp.lock().await;
        let nodes = q.execute("query-named-block-nodes", None).await.unwrap();
        assert!(
            !nodes.to_string().contains(&format!("\"{na}\"")),
            "node {na} left: {nodes}"
        );
        let gone = q
            .execute(
                "qom-get",
                Some(json!({"path": format!("/machine/peripheral/{da}"), "property": "lun"})),
            )
            .await;
        assert!(gone.is_err(), "device {da} left");
        drop(q);
        let c = h
            .plug_disk(&std::fs::File::open(&image).unwrap(), "layer-c")
            .await
            .unwrap();
        assert!(c > b, "LUN {a} came back as {c}");

        // A scratch disk: writable, flushes kept from the host's disk; a read-only fd refused.
        let e = h
            .plug_scratch(&std::fs::File::open(&image).unwrap(), "scratch-a")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-write"), "{e}");
        // Its own file: the image's readers hold shared locks that a writer can't join.
        let scratch = dir.path().join("scratch.img");
        std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
        let own = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&scratch)
            .unwrap();
        let s = h.plug_scratch(&own, "scratch-a").await.unwrap();
        let nodes = h
            .qmp
            .lock()
            .await
            .execute("query-named-block-nodes", None)
            .await
            .unwrap();
        let (ns, _) = names(s);
        let found = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node-name"] == ns.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no node {ns}: {nodes}"));
        assert_eq!(found["ro"], false, "{found}");
        assert_eq!(found["cache"]["no-flush"], true, "{found}");
        let _ = h.qmp.lock().await.quit().await;
        let _ = child.wait().await;
    }
}
