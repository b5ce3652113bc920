//! The layer cache against the real `mkfs.erofs` (erofs-utils, installed by `make setup`).
//! The host kernel here has no erofs, so an image's content is read back with
//! `fsck.erofs --extract`, which checks every file's encoding on the way.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// Root and erofs-utils, or why the test skips.
fn usable(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: needs root (mknod, chown, trusted.* xattrs)");
        return false;
    }
    if which_mkfs().is_none() {
        eprintln!("SKIPPED {test}: no mkfs.erofs (erofs-utils; `make setup` installs it)");
        return false;
    }
    true
}

fn which_mkfs() -> Option<PathBuf> {
    which::which("mkfs.erofs").ok()
}

/// A layer as containerd's overlay snapshotter leaves one: files, a setuid binary, a hard
/// link, a symlink, a whiteout (`c 0:0`) and an opaque directory.
fn layer(root: &Path) -> PathBuf {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let l = root.join("snapshots/1/fs");
    std::fs::create_dir_all(l.join("etc")).unwrap();
    std::fs::create_dir_all(l.join("opaque")).unwrap();
    std::fs::write(l.join("etc/os-release"), "ID=test\n").unwrap();
    std::fs::write(l.join("su"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(l.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(l.join("etc/os-release"), Some(1234), Some(5678)).unwrap();
    std::fs::hard_link(l.join("etc/os-release"), l.join("etc/os-release.link")).unwrap();
    std::os::unix::fs::symlink("etc/os-release", l.join("release")).unwrap();
    mknod(
        &l.join("gone"),
        SFlag::S_IFCHR,
        Mode::empty(),
        makedev(0, 0),
    )
    .unwrap();
    rustix::fs::setxattr(
        l.join("opaque"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    l
}

fn cache(root: &Path) -> LayerCache {
    LayerCache::open(&root.join("cache"), which_mkfs().unwrap()).unwrap()
}

fn image(c: &LayerCache, l: &Path) -> LayerImage {
    c.image_for(l).unwrap().unwrap()
}

#[test]
fn a_layer_is_imaged_once_with_what_overlayfs_and_the_container_need() {
    if !usable("a_layer_is_imaged_once_with_what_overlayfs_and_the_container_need") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let l = layer(t.path());
    let c = cache(t.path());
    let first = image(&c, &l);
    assert!(first.built);
    let again = image(&c, &l);
    assert_eq!(
        (again.path.clone(), again.built),
        (first.path.clone(), false)
    );
    let mode = std::fs::metadata(t.path().join("cache"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the cache is root's only");

    let out = t.path().join("out");
    let done = std::process::Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg(&first.path)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("etc/os-release")).unwrap(),
        "ID=test\n"
    );
    let m = std::fs::symlink_metadata(out.join("etc/os-release")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(
        std::fs::read_link(out.join("release")).unwrap(),
        Path::new("etc/os-release")
    );
    let wh = std::fs::symlink_metadata(out.join("gone")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "the whiteout"
    );
    // fsck 1.5 extracts neither hard links nor xattrs: dump.erofs shows the inodes.
    let dump = |path: &str| {
        let o = std::process::Command::new("dump.erofs")
            .arg(format!("--path={path}"))
            .arg(&first.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let nid = |d: &str| {
        d.split_whitespace()
            .skip_while(|w| *w != "NID:")
            .nth(1)
            .map(str::to_owned)
    };
    let (a, b) = (dump("/etc/os-release"), dump("/etc/os-release.link"));
    assert!(
        a.contains("Links: 2") && nid(&a).is_some() && nid(&a) == nid(&b),
        "{a}{b}"
    );
    assert!(
        !dump("/opaque").contains("Xattr size: 0"),
        "{}",
        dump("/opaque")
    );
    // The opaque marker's name is in the image, after the `trusted.` prefix's index.
    let raw = std::fs::read(&first.path).unwrap();
    assert!(
        raw.windows(14).any(|w| w == b"overlay.opaque"),
        "trusted.overlay.opaque kept"
    );
}

#[test]
fn a_truncated_or_corrupted_image_is_found_and_built_again() {
    if !usable("a_truncated_or_corrupted_image_is_found_and_built_again") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let l = layer(t.path());
    // Enough data that a flipped byte lands in a file, not in the metadata.
    std::fs::write(l.join("data"), vec![7u8; 256 << 10]).unwrap();
    let c = cache(t.path());
    let img = image(&c, &l).path;
    let whole = std::fs::read(&img).unwrap();
    for what in ["truncated", "a data byte", "the superblock"] {
        let mut b = whole.clone();
        match what {
            "truncated" => b.truncate(b.len() / 2),
            "a data byte" => {
                let at = b.len() - 4096 - 100;
                b[at] ^= 0xff;
            }
            _ => b[1024 + 40] ^= 0xff,
        }
        std::fs::write(&img, &b).unwrap();
        let again = image(&c, &l);
        assert!(again.built, "{what}: not noticed");
        assert!(check_superblock(&again.path).is_ok(), "{what}");
        assert!(
            !image(&c, &l).built,
            "{what}: the rebuilt image is used again"
        );
    }
    assert!(check_superblock(&img).is_ok());
}

#[test]
fn the_superblock_check_knows_a_sound_image_from_others() {
    if !usable("the_superblock_check_knows_a_sound_image_from_others") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let l = layer(t.path());
    let img = image(&cache(t.path()), &l).path;
    let sb = check_superblock(&img).unwrap();
    assert_eq!(
        sb.blocks * sb.block_size,
        std::fs::metadata(&img).unwrap().len()
    );
    let other = t.path().join("zeros");
    std::fs::write(&other, vec![0u8; 8192]).unwrap();
    assert_eq!(check_superblock(&other), Err("no erofs magic".to_owned()));
    std::fs::write(&other, b"short").unwrap();
    assert!(check_superblock(&other).unwrap_err().contains("shorter"));
}

#[test]
fn a_layer_made_again_is_another_and_collection_removes_what_no_layer_uses() {
    if !usable("a_layer_made_again_is_another_and_collection_removes_what_no_layer_uses") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let l = layer(t.path());
    let c = cache(t.path());
    let old = image(&c, &l).path;
    assert!(c.collect().unwrap().is_empty(), "the layer is still there");
    std::fs::remove_dir_all(t.path().join("snapshots")).unwrap();
    let l = layer(t.path());
    let new = image(&c, &l);
    assert!(
        new.built && new.path != old,
        "a wiped and refilled snapshot is a new layer"
    );
    std::fs::write(c.dir.join("stale.erofs.tmp"), b"x").unwrap();
    assert_eq!(c.collect().unwrap(), vec![old.clone()]);
    assert!(!old.exists() && new.path.exists());
    assert!(
        !c.dir.join("stale.erofs.tmp").exists(),
        "an interrupted build's file"
    );
    let left: Vec<_> = std::fs::read_dir(&c.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left.len(),
        3,
        "the live image, its record and lock: {left:?}"
    );
}

#[test]
fn a_name_erofs_utils_1_5_would_drop_is_refused() {
    if !usable("a_name_erofs_utils_1_5_would_drop_is_refused") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let l = layer(t.path());
    std::fs::write(l.join("etc/lost+found.txt"), "kept under runc\n").unwrap();
    let Err(Unsupported(why)) = cache(t.path()).image_for(&l).unwrap() else {
        panic!("imaged a layer that would lose a file");
    };
    assert!(why.contains("lost+found.txt"), "{why}");
}
