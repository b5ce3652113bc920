//! The host never follows a path the guest controls (issue: unmount through a planted
//! symlink). Each test stages, from the host side, what guest root can do through virtio-fs
//! (rename `<cid>` away in the share, plant `<cid>/rootfs` as a symlink to a host mount), then
//! drives one host path that unmounts a rootfs: delete, a failed create, and `shim delete`
//! after a crash. The victim mount must survive and the real rootfs must not leak.
//!
//! They need root (real mounts); without it each says so and returns.

use std::path::{Path, PathBuf};

use cocoon_protocol::ProcessRef;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::fake::Rig;

/// A tmpfs outside the pod's directory, standing for any host mount.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Victim {
    fn mount() -> Victim {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("victim");
        std::fs::create_dir(&path).unwrap();
        let none: Option<&str> = None;
        mount(Some("tmpfs"), &path, Some("tmpfs"), MsFlags::empty(), none).unwrap();
        std::fs::write(path.join("precious"), "x").unwrap();
        Victim { _dir: dir, path }
    }

    fn intact(&self) -> bool {
        is_mount_point(&self.path) && self.path.join("precious").exists()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
    }
}

fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

fn is_mount_point(p: &Path) -> bool {
    mount_points().contains(&p.to_string_lossy().into_owned())
}

fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// What guest root can do through virtio-fs, done from the host on the exported tree: move
/// the container's directory away and put a symlink to the victim where its rootfs was.
/// Returns the steps that succeeded.
fn stage_attack(run_dir: &Path, cid: &str, victim: &Path) -> Vec<&'static str> {
    let export = vmm_driver::share::export_dir(run_dir);
    let mut done = vec![];
    if std::fs::rename(export.join(cid), export.join(format!("{cid}.moved"))).is_ok() {
        done.push("rename");
    }
    if std::fs::create_dir(export.join(cid)).is_ok() {
        done.push("mkdir");
    }
    if std::os::unix::fs::symlink(victim, export.join(cid).join("rootfs")).is_ok() {
        done.push("symlink");
    }
    done
}

/// The victim mount survived, nothing stayed mounted below the pod's directory, and the guest
/// could not even stage the attack.
fn assert_attack_failed(victim: &Victim, run_dir: &Path, done: &[&str]) {
    assert!(
        victim.intact(),
        "the host unmounted a mount the guest pointed at ({done:?})"
    );
    assert_eq!(
        mounts_below(run_dir),
        Vec::<String>::new(),
        "leaked ({done:?})"
    );
    assert!(
        done.is_empty(),
        "the guest could change the share's upper levels: {done:?}"
    );
}

/// A directory to bind as a container's rootfs.
fn image() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("bin")).unwrap();
    d
}

fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("SKIPPED {test}: needs root for real mounts");
    }
    root
}

fn request(rig: &Rig, id: &str, image: &Path) -> super::CreateRequest {
    let mut req = rig.create_request(id);
    req.rootfs.bundle_rootfs = image.to_owned();
    req
}

#[tokio::test]
async fn delete_does_not_follow_a_planted_symlink() {
    if !root_or_skip("delete_does_not_follow_a_planted_symlink") {
        return;
    }
    let rig = Rig::with_real_mounts();
    let victim = Victim::mount();
    let img = image();
    rig.pod
        .create(request(&rig, "c1", img.path()))
        .await
        .unwrap();
    let rootfs = vmm_driver::share::host_dir(rig.dir.path()).join("c1/rootfs");
    assert!(is_mount_point(&rootfs) && rootfs.join("bin").exists());
    let done = stage_attack(rig.dir.path(), "c1", &victim.path);
    rig.pod.delete(&ProcessRef::init("c1")).await.unwrap();
    assert_attack_failed(&victim, rig.dir.path(), &done);
}

#[tokio::test]
async fn a_failed_create_does_not_follow_a_planted_symlink() {
    if !root_or_skip("a_failed_create_does_not_follow_a_planted_symlink") {
        return;
    }
    let rig = Rig::with_real_mounts();
    let victim = Victim::mount();
    let img = image();
    // The guest stages the attack while the host waits for CreateContainer, then fails it.
    let (run, target) = (rig.dir.path().to_owned(), victim.path.clone());
    let staged = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let log = staged.clone();
    rig.on_create(Box::new(move |cid| {
        *log.lock().unwrap() = stage_attack(&run, cid, &target);
    }));
    rig.pod
        .create(request(&rig, "bad1", img.path()))
        .await
        .unwrap_err();
    let done = staged.lock().unwrap().clone();
    assert_attack_failed(&victim, rig.dir.path(), &done);
}

#[tokio::test]
async fn crash_cleanup_does_not_follow_a_planted_symlink() {
    if !root_or_skip("crash_cleanup_does_not_follow_a_planted_symlink") {
        return;
    }
    let rig = Rig::with_real_mounts();
    let victim = Victim::mount();
    let img = image();
    rig.pod
        .create(request(&rig, "c1", img.path()))
        .await
        .unwrap();
    let done = stage_attack(rig.dir.path(), "c1", &victim.path);
    // The shim is gone; containerd runs `shim delete`, which has only state.json to go by.
    crate::state::cleanup(rig.dir.path());
    assert_attack_failed(&victim, rig.dir.path(), &done);
}

#[tokio::test]
async fn a_device_node_the_guest_makes_in_its_rootfs_is_not_honoured_on_the_host() {
    if !root_or_skip("a_device_node_the_guest_makes_in_its_rootfs_is_not_honoured_on_the_host") {
        return;
    }
    let rig = Rig::with_real_mounts();
    let img = image();
    rig.pod
        .create(request(&rig, "c1", img.path()))
        .await
        .unwrap();
    // What guest root can do through virtio-fs: create a device node in its writable rootfs
    // (here /dev/null's numbers; a disk's would do the same). Opening it on the host through
    // the exported tree, as virtiofsd would on the guest's behalf, must fail.
    let node = vmm_driver::share::export_dir(rig.dir.path()).join("c1/rootfs/devnode");
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let e = std::fs::File::open(&node).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let rootfs = vmm_driver::share::host_dir(rig.dir.path()).join("c1/rootfs");
    let line = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*rootfs.to_string_lossy()))
        .unwrap()
        .to_owned();
    let opts = line.split(' ').nth(5).unwrap();
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{line}");
    // The bundle's rootfs itself stays as it was, and no staging mount is left.
    assert!(img.path().join("bin").exists());
    assert_eq!(
        mounts_below(&rig.dir.path().join(vmm_driver::share::STAGING_DIR)),
        Vec::<String>::new()
    );
    rig.pod.delete(&ProcessRef::init("c1")).await.unwrap();
    std::fs::remove_file(img.path().join("devnode")).ok();
}
