//! A container rootfs assembled in the guest (issue #29): overlayfs over the image's layers,
//! each a read-only EROFS disk the shim hot-plugged as a SCSI LUN, with the writable layer on
//! the container's own scratch disk (or a tmpfs of its own). Nothing of it is on the host's
//! side: the host never mounts what the guest wrote, and the guest reads the layers without a
//! FUSE round trip.
//!
//! A layer disk is mounted once per pod and shared by every container that uses it; the last
//! one to go unmounts it, before the shim takes the disk out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cocoon_protocol::agent::LayerRootfs;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{Failure, Res};

/// Where layer disks are mounted, one directory per LUN.
const LAYERS: &str = "/run/cocoon/layers";
/// Where container rootfs are assembled: `<id>/rw` (the writable layer's filesystem) and
/// `<id>/root` (the overlay).
const ROOTFS: &str = "/run/cocoon/rootfs";
/// How long a hot-plugged LUN may take to appear as a block device.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// The layer disks mounted in the guest, with how many containers use each, and the LUNs each
/// assembled container holds (what its removal releases, once).
#[derive(Debug, Default)]
pub struct Layers {
    users: Mutex<HashMap<u32, usize>>,
    held: Mutex<HashMap<String, Vec<u32>>>,
}

impl Layers {
    /// Mounts `want`'s layers (those not mounted yet), the container's writable layer and the
    /// overlay; returns the rootfs. On failure, what this call mounted is gone again.
    pub fn assemble(&self, id: &str, want: &LayerRootfs) -> Res<PathBuf> {
        if want.layers.is_empty() {
            return Err(Failure::Invalid(format!(
                "container {id}: a layer rootfs needs at least one layer"
            )));
        }
        let mut taken = vec![];
        let built = self.take_all(want, &mut taken).and_then(|lowers| {
            let dir = Path::new(ROOTFS).join(id);
            overlay(&dir, &lowers, want).inspect_err(|_| teardown(&dir))
        });
        match built {
            Ok(_) => {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                held.insert(id.to_owned(), taken);
            }
            Err(_) => self.release(&taken),
        }
        built
    }

    fn take_all(&self, want: &LayerRootfs, taken: &mut Vec<u32>) -> Res<Vec<PathBuf>> {
        want.layers
            .iter()
            .map(|l| {
                let dir = self.take(l.lun)?;
                taken.push(l.lun);
                Ok(dir)
            })
            .collect()
    }

    /// Counts one more user of LUN `lun`, mounting it for the first.
    fn take(&self, lun: u32) -> Res<PathBuf> {
        let dir = Path::new(LAYERS).join(lun.to_string());
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = users.get_mut(&lun) {
            *n += 1;
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| fail("create", &dir, e))?;
        // Read-only, as the disk is; not nosuid or nodev: the image's setuid programs and
        // device nodes mean what they mean under runc (the overlay is what the container uses).
        mount_disk(lun, &dir, "erofs", MsFlags::MS_RDONLY, None).inspect_err(|_| {
            let _ = std::fs::remove_dir(&dir);
        })?;
        users.insert(lun, 1);
        Ok(dir)
    }

    /// Drops one use of each LUN, unmounting those nobody uses any more.
    fn release(&self, luns: &[u32]) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for lun in luns {
            let Some(n) = users.get_mut(lun) else {
                continue;
            };
            *n -= 1;
            if *n == 0 {
                users.remove(lun);
                let dir = Path::new(LAYERS).join(lun.to_string());
                unmount(&dir);
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }

    /// Takes a container's rootfs apart, if it has one assembled: the overlay, its writable
    /// layer (and with it everything the container wrote), and its uses of the layers. A
    /// second call, or one for a container on the share, does nothing.
    pub fn disassemble(&self, id: &str) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(luns) = held {
            teardown(&Path::new(ROOTFS).join(id));
            self.release(&luns);
        }
    }
}

/// The writable layer's filesystem at `dir/rw` (the scratch disk, or a tmpfs) and the overlay
/// at `dir/root`; returns the latter.
fn overlay(dir: &Path, lowers: &[PathBuf], want: &LayerRootfs) -> Res<PathBuf> {
    let rw = dir.join("rw");
    let root = dir.join("root");
    for d in [&rw, &root] {
        std::fs::create_dir_all(d).map_err(|e| fail("create", d, e))?;
    }
    if want.scratch_lun != 0 {
        // The shim made it with lazy inode tables on a sparse file, whose unwritten blocks
        // read as zeros: nothing is left for the guest to initialise in the background.
        mount_disk(
            want.scratch_lun,
            &rw,
            "ext4",
            MsFlags::empty(),
            Some("noinit_itable"),
        )?;
    } else {
        let mut opts = String::from("mode=0755");
        if want.upper_size_bytes > 0 {
            opts.push_str(&format!(",size={}", want.upper_size_bytes));
        }
        mount(
            Some("tmpfs"),
            &rw,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| Failure::Failed(format!("mount the writable layer's tmpfs: {e}")))?;
    }
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir(d).map_err(|e| fail("create", d, e))?;
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| Failure::Failed(format!("mount the rootfs overlay ({opts}): {e}")))?;
    Ok(root)
}

fn teardown(dir: &Path) {
    for m in ["root", "rw"] {
        let p = dir.join(m);
        unmount(&p);
        let _ = std::fs::remove_dir(&p);
    }
    let _ = std::fs::remove_dir(dir);
}

/// Unmounts `dir` if it is mounted; a busy mount is detached (what still uses it keeps it
/// until done) rather than left behind.
fn unmount(dir: &Path) {
    if umount2(dir, MntFlags::empty()).is_err() {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
    }
}

/// Mounts the disk at LUN `lun` on the virtio-scsi controller at `dir`, once the guest has
/// added it: the controller's hot-plug event may still be in flight when the create arrives,
/// and the device node appears a moment before the disk can be opened (ENXIO meanwhile).
fn mount_disk(lun: u32, dir: &Path, fs: &str, flags: MsFlags, data: Option<&str>) -> Res<()> {
    let t0 = Instant::now();
    loop {
        let dev = find_lun(Path::new("/sys"), lun).map(|d| Path::new("/dev").join(d));
        let tried = match &dev {
            Some(d) if d.exists() => match mount(Some(d), dir, Some(fs), flags, data) {
                Ok(()) => return Ok(()),
                Err(e) => Some(e),
            },
            _ => None,
        };
        let transient = matches!(
            tried,
            None | Some(nix::errno::Errno::ENXIO | nix::errno::Errno::ENOENT)
        );
        if !transient || t0.elapsed() > DISK_WAIT {
            let what = match (&dev, tried) {
                (Some(d), Some(e)) => format!("mount {} as {fs}: {e}", d.display()),
                _ => format!("it did not appear in the guest within {DISK_WAIT:?}"),
            };
            return Err(Failure::Failed(format!("disk LUN {lun}: {what}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The block device name (`sdX`) of LUN `lun` on target 0 of the virtio-scsi host, from
/// `sys/class/scsi_disk/<host>:0:0:<lun>/device/block/`.
fn find_lun(sys: &Path, lun: u32) -> Option<String> {
    let entries = std::fs::read_dir(sys.join("class/scsi_disk")).ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.split(':');
        let (Some(host), Some("0"), Some("0"), Some(l)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if l != lun.to_string() {
            continue;
        }
        let proc_name = sys.join(format!("class/scsi_host/host{host}/proc_name"));
        let ours = std::fs::read_to_string(proc_name).is_ok_and(|s| s.trim() == "virtio_scsi");
        if !ours {
            continue;
        }
        let block = std::fs::read_dir(e.path().join("device/block")).ok()?;
        if let Some(b) = block.flatten().next() {
            return Some(b.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

fn fail(what: &str, p: &Path, e: std::io::Error) -> Failure {
    Failure::Failed(format!("{what} {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sysfs layout of a 6.1 guest with a virtio-scsi disk at LUN 3 and another SCSI host.
    #[test]
    fn a_lun_is_found_on_the_virtio_scsi_host_only() {
        let sys = tempfile::tempdir().unwrap();
        let disk = |name: &str, dev: &str| {
            let d = sys.path().join("class/scsi_disk").join(name);
            std::fs::create_dir_all(d.join("device/block").join(dev)).unwrap();
        };
        let host = |n: u32, proc_name: &str| {
            let d = sys.path().join(format!("class/scsi_host/host{n}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("proc_name"), format!("{proc_name}\n")).unwrap();
        };
        host(0, "ata_piix");
        host(2, "virtio_scsi");
        disk("0:0:0:3", "sda");
        disk("2:0:0:3", "sdb");
        disk("2:0:1:4", "sdc");
        assert_eq!(find_lun(sys.path(), 3).as_deref(), Some("sdb"));
        assert_eq!(find_lun(sys.path(), 4), None, "target 1 is not ours");
        assert_eq!(find_lun(sys.path(), 5), None);
    }
}
