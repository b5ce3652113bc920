//! The pod's side of layer disks (`layer_rootfs.rs`) against the fake agent and a recording
//! `DiskHotplug`, with real EROFS images: what a create plugs in and tells the guest, that a
//! pod plugs an image once for all its containers, and that deletes and failed creates take
//! out exactly what they plugged.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::ProcessRef;
use containerd_shim_protos::api;

use super::fake::{Journal, Rig};
use crate::layers::{plain_runner, LayerCache, ScratchMaker};
use crate::pod::LayerPolicy;

#[derive(Debug)]
struct FakeDisks {
    journal: Journal,
    next: AtomicU32,
}

#[async_trait]
impl vmm_driver::DiskHotplug for FakeDisks {
    async fn add_disk(&self, _: &std::fs::File, _: &str) -> vmm_driver::Result<u32> {
        let lun = self.next.fetch_add(1, Ordering::SeqCst);
        self.journal.add(format!("disk add {lun}"));
        Ok(lun)
    }

    async fn add_scratch(&self, disk: &std::fs::File, _: &str) -> vmm_driver::Result<u32> {
        let lun = self.next.fetch_add(1, Ordering::SeqCst);
        let writable = rustix::fs::fcntl_getfl(disk)
            .unwrap()
            .contains(rustix::fs::OFlags::RDWR);
        self.journal
            .add(format!("scratch add {lun} writable {writable}"));
        Ok(lun)
    }

    async fn remove_disk(&self, lun: u32) -> vmm_driver::Result<()> {
        self.journal.add(format!("disk remove {lun}"));
        Ok(())
    }
}

/// A directory on disk, as the default scratch_dir is (/tmp may not take O_TMPFILE files).
fn on_disk() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// A rig whose pod makes layer disks from real images in `dir`, with scratch disks if
/// `scratch`; `None` where erofs-utils or e2fsprogs are missing.
fn rig(dir: &Path, scratch: bool) -> Option<Rig> {
    let (Ok(erofs), Ok(ext4)) = (which::which("mkfs.erofs"), which::which("mkfs.ext4")) else {
        eprintln!("SKIPPED: no mkfs.erofs or mkfs.ext4");
        return None;
    };
    let rig = Rig::new();
    let cache = LayerCache::open(&dir.join("cache"), erofs).unwrap();
    let scratch = scratch
        .then(|| ScratchMaker::new(&dir.join("scratch"), 64 << 20, ext4, plain_runner()).unwrap());
    let disks = Arc::new(FakeDisks {
        journal: rig.journal.clone(),
        next: AtomicU32::new(1),
    });
    let policy = LayerPolicy {
        cache,
        scratch,
        upper_size_bytes: 0,
    };
    *rig.factory.layers.lock().unwrap() = Some((policy, disks));
    Some(rig)
}

/// A create request whose rootfs is an overlay of two layers (made in `dir`) with an empty
/// upper, as containerd's overlay snapshotter hands it over.
fn layered_request(rig: &Rig, dir: &Path, id: &str) -> super::CreateRequest {
    for (layer, file) in [("l1", "a"), ("l2", "b")] {
        std::fs::create_dir_all(dir.join(layer)).unwrap();
        std::fs::write(dir.join(layer).join(file), file).unwrap();
    }
    let upper = dir.join(format!("{id}-upper"));
    std::fs::create_dir_all(&upper).unwrap();
    let mut req = rig.create_request(id);
    req.rootfs.mounts = vec![api::Mount {
        type_: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("upperdir={}", upper.display()),
            format!(
                "lowerdir={}:{}",
                dir.join("l2").display(),
                dir.join("l1").display()
            ),
        ],
        ..Default::default()
    }];
    req
}

fn init(cid: &str) -> ProcessRef {
    ProcessRef::init(cid)
}

/// The journal from the first entry that starts with `from`.
fn since(rig: &Rig, from: &str) -> Vec<String> {
    let all = rig.journal.entries();
    let at = all.iter().position(|e| e.starts_with(from)).unwrap();
    all[at..].to_vec()
}

#[tokio::test]
async fn containers_of_one_image_share_its_disks_and_the_last_one_takes_them_out() {
    let dir = on_disk();
    let Some(rig) = rig(dir.path(), false) else {
        return;
    };
    // A container on the share holds the VM, so that the disks are taken out while it runs.
    rig.pod.create(rig.create_request("c0")).await.unwrap();
    for id in ["c1", "c2"] {
        let req = layered_request(&rig, dir.path(), id);
        rig.pod.create(req).await.unwrap();
    }
    rig.pod.delete(&init("c1")).await.unwrap();
    rig.pod.delete(&init("c2")).await.unwrap();
    assert_eq!(
        since(&rig, "mount c0"),
        [
            "mount c0/rootfs",
            "agent create c0",
            // Topmost first, each image plugged in once.
            "disk add 1",
            "disk add 2",
            "agent create c1 layers [1, 2] scratch 0",
            "agent create c2 layers [1, 2] scratch 0",
            "agent remove c1",
            "agent remove c2",
            "disk remove 1",
            "disk remove 2",
        ]
    );
    assert!(
        rig.journal
            .entries()
            .iter()
            .all(|e| !e.contains("c1/rootfs")),
        "a layered rootfs was mounted on the host"
    );
}

#[tokio::test]
async fn a_failed_create_takes_out_the_disks_it_plugged_and_each_container_has_its_scratch() {
    let dir = on_disk();
    let Some(rig) = rig(dir.path(), true) else {
        return;
    };
    rig.pod.create(rig.create_request("c0")).await.unwrap();
    // The fake agent refuses ids starting with "bad".
    let bad = layered_request(&rig, dir.path(), "bad1");
    assert!(rig.pod.create(bad).await.is_err());
    let c1 = layered_request(&rig, dir.path(), "c1");
    rig.pod.create(c1).await.unwrap();
    let c2 = layered_request(&rig, dir.path(), "c2");
    rig.pod.create(c2).await.unwrap();
    rig.pod.delete(&init("c1")).await.unwrap();
    assert_eq!(
        since(&rig, "disk add"),
        [
            "disk add 1",
            "disk add 2",
            "scratch add 3 writable true",
            "agent create bad1 layers [1, 2] scratch 3",
            "disk remove 1",
            "disk remove 2",
            "disk remove 3",
            // Plugged in again, under new LUNs.
            "disk add 4",
            "disk add 5",
            "scratch add 6 writable true",
            "agent create c1 layers [4, 5] scratch 6",
            "scratch add 7 writable true",
            "agent create c2 layers [4, 5] scratch 7",
            "agent remove c1",
            // c1's scratch disk goes; the images stay for c2.
            "disk remove 6",
        ]
    );
}

#[tokio::test]
async fn a_rootfs_with_writes_already_in_its_snapshot_keeps_the_share() {
    let dir = on_disk();
    let Some(rig) = rig(dir.path(), false) else {
        return;
    };
    let req = layered_request(&rig, dir.path(), "c1");
    std::fs::write(dir.path().join("c1-upper/written"), "x").unwrap();
    rig.pod.create(req).await.unwrap();
    assert_eq!(
        rig.journal.entries(),
        ["vm boot pod1", "mount c1/rootfs", "agent create c1"]
    );
}

#[tokio::test]
async fn a_container_annotated_for_the_share_keeps_it() {
    let dir = on_disk();
    let Some(rig) = rig(dir.path(), false) else {
        return;
    };
    let mut req = layered_request(&rig, dir.path(), "c1");
    req.spec = serde_json::json!({"annotations": {crate::annotations::ROOTFS: "virtio-fs"}});
    rig.pod.create(req).await.unwrap();
    assert_eq!(
        rig.journal.entries(),
        ["vm boot pod1", "mount c1/rootfs", "agent create c1"]
    );
}
