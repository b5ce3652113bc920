//! Container root filesystems as layer disks (issue #29), end to end through a private
//! containerd: the image's layers reach the guest as read-only EROFS disks built once into a
//! cache, and what the container writes stays in the guest. Each case that has a runc
//! counterpart runs it too.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cocoon_tests::containerd::{write_layered_image, Containerd, DEFAULT_PATH, IMAGE, RUNTIME};
use cocoon_tests::leaks::mounts_mentioning;
use cocoon_tests::{gate, Need};

const RUNC: &str = "io.containerd.runc.v2";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A containerd whose Cocoon shims keep layer images in a cache of the test's own.
fn containerd_with_cache() -> (Containerd, PathBuf) {
    let c = Containerd::start();
    let cache = c.dir.path().join("layers");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&c.cocoon_config)
        .unwrap();
    writeln!(f, "rootfs.layer_cache_dir = \"{}\"", cache.display()).unwrap();
    (c, cache)
}

fn images_in(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn run(c: &Containerd, runtime: &str, image: &str, id: &str, script: &str) -> String {
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        image,
        id,
        "sh",
        "-c",
        script,
    ]);
    assert!(
        out.status.success(),
        "{runtime} {id}: {}\n{}\ncontainerd log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        c.log()
    );
    text(&out.stdout)
}

/// Files named `name` anywhere below `dir` (the snapshotter's directories, on the host).
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if e.file_name() == name {
                found.push(e.path());
            }
        }
    }
    found
}

#[tokio::test]
async fn the_image_comes_as_layer_disks_and_the_containers_writes_stay_in_the_guest() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, cache) = containerd_with_cache();
    c.import_test_image();
    let snapshots = c.dir.path().join("root");
    let script = "grep ' / / ' /proc/self/mountinfo; echo kept > /written-by-the-test; \
                  cat /written-by-the-test; ls /bin/busybox";
    let out = run(&c, RUNTIME, IMAGE, "layers", script);
    assert!(
        out.contains(" - overlay ") && out.contains("lowerdir=/run/cocoon/layers/"),
        "the rootfs is not an overlay over layer disks: {out}"
    );
    assert!(
        out.contains("kept") && out.contains("/bin/busybox"),
        "{out}"
    );
    assert_eq!(images_in(&cache).len(), 1, "one layer, one image");
    assert!(
        files_named(&snapshots, "written-by-the-test").is_empty(),
        "the guest's write reached the host's snapshot"
    );
    // Under runc the same write lands in the snapshot's upper directory on the host: the
    // check above can see one.
    run(&c, RUNC, IMAGE, "layers-runc", script);
    assert_eq!(
        files_named(&snapshots, "written-by-the-test").len(),
        1,
        "runc's write is in its snapshot"
    );
    c.assert_clean();
}

#[tokio::test]
async fn a_detached_containers_rootfs_is_no_host_mount_and_its_disk_goes_with_it() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, _cache) = containerd_with_cache();
    c.import_test_image();
    c.run_detached("held", &["sleep", "600"]);
    let mounts = mounts_mentioning(&c.cocoon_state);
    assert!(
        mounts.iter().all(|m| !m.contains("held/rootfs")),
        "a host mount for a rootfs the guest assembles: {mounts:#?}"
    );
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "look",
        "held",
        "sh",
        "-c",
        "echo x > /tmp/x && cat /tmp/x && grep -c erofs /proc/self/mountinfo || true",
    ]);
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert!(
        text(&exec.stdout).starts_with("x\n"),
        "{}",
        text(&exec.stdout)
    );
    c.kill_and_remove("held");
    c.assert_clean();
}

#[tokio::test]
async fn a_layer_image_is_built_once_for_two_pods_and_rebuilt_when_damaged() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, cache) = containerd_with_cache();
    c.import_test_image();
    let check = "test -x /bin/busybox && echo sound";
    assert!(run(&c, RUNTIME, IMAGE, "first", check).contains("sound"));
    let [image] = &images_in(&cache)[..] else {
        panic!("one image expected: {:?}", images_in(&cache));
    };
    let built = std::fs::metadata(image).unwrap();
    assert!(run(&c, RUNTIME, IMAGE, "second", check).contains("sound"));
    let again = std::fs::metadata(image).unwrap();
    assert_eq!(
        (again.ino(), again.mtime_nsec(), again.mtime()),
        (built.ino(), built.mtime_nsec(), built.mtime()),
        "the second pod rebuilt the image"
    );

    // Truncated: half of it gone.
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.set_len(built.len() / 2).unwrap();
    drop(f);
    assert!(run(&c, RUNTIME, IMAGE, "truncated", check).contains("sound"));
    let rebuilt = std::fs::metadata(image).unwrap();
    assert_eq!(rebuilt.len(), built.len());
    assert_ne!(rebuilt.ino(), built.ino(), "a truncated image was used");

    // Corrupted: one byte of the data flipped, the length kept.
    let mut bytes = std::fs::read(image).unwrap();
    let at = bytes.len() - 4096 - 7;
    bytes[at] ^= 0xff;
    std::fs::write(image, &bytes).unwrap();
    let damaged = std::fs::metadata(image).unwrap().ino();
    assert!(run(&c, RUNTIME, IMAGE, "corrupted", check).contains("sound"));
    assert_ne!(
        std::fs::metadata(image).unwrap().ino(),
        damaged,
        "a corrupted image was used"
    );
    c.assert_clean();
}

/// A tar of `files` (path, contents) and `whiteouts` (the OCI `.wh.` names).
fn layer_tar(files: &[(&str, &str)], whiteouts: &[&str]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        t.append_data(&mut h, name, data).unwrap();
    };
    for (p, data) in files {
        add(p, data.as_bytes(), 0o644);
    }
    for w in whiteouts {
        add(w, b"", 0o644);
    }
    t.into_inner().unwrap()
}

#[tokio::test]
async fn a_file_deleted_in_an_upper_layer_is_gone_as_under_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, cache) = containerd_with_cache();
    // Three layers: busybox; a layer with /data/{gone,kept} and /opq/old; a layer that
    // deletes /data/gone, adds /data/new, and makes /opq opaque with /opq/fresh in it.
    let base = tempfile::tempdir().unwrap();
    cocoon_tests::oci::busybox_rootfs(base.path());
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", base.path()).unwrap();
    let layers = [
        b.into_inner().unwrap(),
        layer_tar(
            &[("data/gone", "g"), ("data/kept", "k"), ("opq/old", "o")],
            &[],
        ),
        layer_tar(
            &[("data/new", "n"), ("opq/fresh", "f")],
            &["data/.wh.gone", "opq/.wh..wh..opq"],
        ),
    ];
    let tarball = c.dir.path().join("layered.tar");
    let name = "docker.io/library/cocoon-layered:latest";
    write_layered_image(
        &tarball,
        name,
        &layers,
        serde_json::json!({"Env": [DEFAULT_PATH], "Cmd": ["sh"]}),
        None,
    );
    let out = c.ctr(&["images", "import", tarball.to_str().unwrap()]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    let script = "ls /data /opq | tr '\\n' ' '";
    let cocoon = run(&c, RUNTIME, name, "layered", script);
    let runc = run(&c, RUNC, name, "layered-runc", script);
    assert_eq!(cocoon, runc);
    assert!(
        cocoon.contains("kept") && cocoon.contains("new") && !cocoon.contains("gone"),
        "{cocoon}"
    );
    assert!(
        cocoon.contains("fresh") && !cocoon.contains("old"),
        "{cocoon}"
    );
    assert_eq!(images_in(&cache).len(), 3, "one image per layer");
    c.assert_clean();
}

/// Guest root, as a privileged container is, clears the kernel's read-only flag on every
/// layer disk it sees and writes to it: QEMU's read-only node refuses, and the image that
/// every pod of the host shares stays byte for byte what it was.
#[tokio::test]
async fn a_guest_that_writes_a_layer_disk_changes_nothing_on_the_host() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, cache) = containerd_with_cache();
    c.import_test_image();
    let check = "test -x /bin/busybox && echo sound";
    assert!(run(&c, RUNTIME, IMAGE, "before", check).contains("sound"));
    let [image] = &images_in(&cache)[..] else {
        panic!("one image expected: {:?}", images_in(&cache));
    };
    let snapshot = |p: &Path| {
        (
            std::fs::read(p).unwrap(),
            std::fs::metadata(p).unwrap().ino(),
        )
    };
    let before = snapshot(image);
    // Every SCSI disk of the guest under 1 GiB: the layer disks (the container's scratch disk
    // is 10 GiB). Not told apart by the kernel's read-only flag: that is what is attacked.
    let attack = "for b in /sys/class/scsi_disk/*/device/block/*; do n=${b##*/}; \
                    [ $(cat /sys/class/block/$n/size) -lt 2097152 ] || continue; \
                    mm=$(cat /sys/class/block/$n/dev); mknod /tmp/$n b ${mm%:*} ${mm#*:}; \
                    blockdev --setrw /tmp/$n; \
                    if dd if=/dev/zero of=/tmp/$n bs=4096 count=4 seek=1 conv=fsync 2>/dev/null; \
                    then echo WROTE-$n; else echo REFUSED-$n; fi; done";
    let out = c.ctr(&[
        "run",
        "--rm",
        "--privileged",
        "--runtime",
        RUNTIME,
        IMAGE,
        "attack",
        "sh",
        "-c",
        attack,
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let said = text(&out.stdout);
    assert!(!said.contains("WROTE"), "a layer disk took a write: {said}");
    assert!(
        said.contains("REFUSED-sd"),
        "no layer disk was tried: {said}"
    );
    assert!(
        snapshot(image) == before,
        "the shared image changed or was rebuilt"
    );
    assert!(run(&c, RUNTIME, IMAGE, "after", check).contains("sound"));
    assert!(snapshot(image) == before, "the next pod rebuilt the image");
    c.assert_clean();
}

#[tokio::test]
async fn an_annotated_container_keeps_its_rootfs_on_the_share_and_a_bad_value_is_refused() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, cache) = containerd_with_cache();
    c.import_test_image();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.cocoon.rootfs=virtio-fs",
        IMAGE,
        "shared",
        "grep",
        " / / ",
        "/proc/self/mountinfo",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let root = text(&out.stdout);
    assert!(root.contains(" - virtiofs "), "not on the share: {root}");
    assert!(images_in(&cache).is_empty(), "an image was built");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.cocoon.rootfs=layers",
        IMAGE,
        "asks",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("io.cocoon.rootfs"),
        "{}",
        text(&out.stderr)
    );
    c.assert_clean();
}
