//! Volumes: bind mounts of host files and directories reach the container (`ctr run --mount`,
//! compared with runc), read-only stays read-only, writes cross both ways, a kubelet-style
//! `..data` swap is seen, and nothing stays mounted on the host afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_tests::containerd::{bind_mount, Containerd, IMAGE, RUNTIME};
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn ctr_run_bind_mounts_of_files_and_directories_match_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    let vol = host.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("hello.txt"), "from-host\n").unwrap();
    let single = host.path().join("single.txt");
    std::fs::write(&single, "one-file\n").unwrap();
    let ro_dir = host.path().join("ro");
    std::fs::create_dir(&ro_dir).unwrap();
    // Docker's `--shm-size`: a host tmpfs bound at /dev/shm; the guest's has its size.
    let shm = host.path().join("shm");
    std::fs::create_dir(&shm).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .unwrap();

    let script = "cat /vol/hello.txt /etc/single; echo written-by-$RT > /vol/out.txt; \
                  (echo x > /etc/single) 2>/dev/null && echo file-ro-broken || echo file-ro-ok; \
                  (touch /ro/x) 2>/dev/null && echo dir-ro-broken || echo dir-ro-ok; \
                  set -- $(stat -f -c '%b %S' /dev/shm); echo shm=$(($1*$2))";
    for (rt, name) in [(RUNTIME, "cocoon"), ("io.containerd.runc.v2", "runc")] {
        let m1 = bind_mount(&vol, "/vol", "rbind:rw");
        let m2 = bind_mount(&single, "/etc/single", "rbind:ro");
        let m3 = bind_mount(&ro_dir, "/ro", "rbind:ro");
        let m4 = bind_mount(&shm, "/dev/shm", "rbind:rw");
        let env = format!("RT={name}");
        let id = format!("vol-{name}");
        let args = [
            "run",
            "--rm",
            "--runtime",
            rt,
            "--env",
            &env,
            "--mount",
            &m1,
            "--mount",
            &m2,
            "--mount",
            &m3,
            "--mount",
            &m4,
            IMAGE,
            &id,
            "sh",
            "-c",
            script,
        ];
        let out = c.ctr(&args);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}\n{stdout}\ncontainerd log:\n{}",
            text(&out.stderr),
            c.log()
        );
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            [
                "from-host",
                "one-file",
                "file-ro-ok",
                "dir-ro-ok",
                "shm=16777216"
            ],
            "{name}"
        );
        // The container's write is on the host; the read-only ones changed nothing.
        assert_eq!(
            std::fs::read_to_string(vol.join("out.txt")).unwrap(),
            format!("written-by-{name}\n")
        );
        assert_eq!(std::fs::read_to_string(&single).unwrap(), "one-file\n");
        assert!(!ro_dir.join("x").exists());
    }
    nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH).unwrap();
    c.assert_clean();
}

/// A read-only bind of a directory that holds a mount of its own: `ro` is the top mount's
/// (what CRI's non-recursive read-only mounts and `ctr --mount …:rbind:ro` ask), so the mount
/// below stays writable, as under runc; and it is a mount in the container too.
#[tokio::test]
async fn read_only_stays_on_the_top_mount_of_a_recursive_bind_as_under_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let seen = read_only_against_runc("rbind:ro");
    assert_eq!(seen.lines().next(), Some("top-ro"));
    assert_eq!(seen.lines().nth(1), Some("sub-rw"), "non-recursive: {seen}");
}

/// `rro` (CRI's `recursiveReadOnly: Enabled`, `docker run --mount …,bind-recursive=readonly`):
/// the mounts below the volume are read-only too, as under runc.
#[tokio::test]
async fn recursive_read_only_reaches_the_mounts_below_as_under_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let seen = read_only_against_runc("rbind:rro");
    assert_eq!(
        seen.lines().take(2).collect::<Vec<_>>(),
        ["top-ro", "sub-ro"],
        "{seen}"
    );
}

/// While a container runs with a volume that holds a mount below it, the host can unmount that
/// mount and remove the volume's directory, as under runc, where the volume's copies live in
/// the container's mount namespace only (critest's read-only mount specs clean up this way,
/// and so do host tools). A bind in the host's namespace would make the `rmdir` fail with
/// EBUSY for as long as the pod lives. The container keeps running and can be stopped.
#[tokio::test]
async fn a_mount_below_a_volume_can_be_removed_on_the_host_while_it_runs_as_under_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    for (rt, name) in [("io.containerd.runc.v2", "runc"), (RUNTIME, "cocoon")] {
        let host = tempfile::tempdir().unwrap();
        let (vol, sub) =
            volume_with_tmpfs_below(host.path(), "tmpfs", nix::mount::MsFlags::empty());
        let m = bind_mount(&vol, "/vol", "rbind:ro");
        let id = format!("rm-{name}");
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            rt,
            "--mount",
            &m,
            IMAGE,
            &id,
            "sleep",
            "1000",
        ]);
        assert!(
            out.status.success(),
            "{name}: run -d: {}",
            text(&out.stderr)
        );
        let out = c.ctr(&["task", "exec", "--exec-id", "look", &id, "ls", "/vol"]);
        assert!(out.status.success(), "{name}: exec: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "tmpfs\n", "{name}");

        nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH).unwrap();
        let removed = std::fs::remove_dir_all(&vol);
        c.kill_and_remove(&id);
        if let Err(e) = removed {
            panic!(
                "{name}: removing {} while the container runs: {e}",
                vol.display()
            );
        }
    }
    c.assert_clean();
}

/// `<host>/vol`, a volume source with a 1 MiB tmpfs mounted (with `flags`) at `vol/<sub>`;
/// returns both paths. The caller unmounts the tmpfs.
fn volume_with_tmpfs_below(
    host: &Path,
    sub: &str,
    flags: nix::mount::MsFlags,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let vol = host.join("vol");
    let below = vol.join(sub);
    std::fs::create_dir_all(&below).unwrap();
    nix::mount::mount(Some("tmpfs"), &below, Some("tmpfs"), flags, Some("size=1m")).unwrap();
    (vol, below)
}

/// Runs a container with a volume holding a tmpfs below it, bound with `options`, under runc
/// and Cocoon; asserts both saw the same (whether the top and the tmpfs are writable, and the
/// tmpfs as a mount of its own) and returns what they saw.
fn read_only_against_runc(options: &str) -> String {
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    let (vol, sub) = volume_with_tmpfs_below(host.path(), "sub", nix::mount::MsFlags::empty());
    let script = "(touch /vol/top) 2>/dev/null && echo top-rw || echo top-ro; \
                  (touch /vol/sub/f-$RT) 2>/dev/null && echo sub-rw || echo sub-ro; \
                  grep -c ' /vol/sub ' /proc/self/mountinfo";
    let mut seen = vec![];
    for (rt, name) in [("io.containerd.runc.v2", "runc"), (RUNTIME, "cocoon")] {
        let m = bind_mount(&vol, "/vol", options);
        let env = format!("RT={name}");
        let id = format!("ro-{name}");
        let args = [
            "run",
            "--rm",
            "--runtime",
            rt,
            "--env",
            &env,
            "--mount",
            &m,
            IMAGE,
            &id,
            "sh",
            "-c",
            script,
        ];
        let out = c.ctr(&args);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        seen.push(text(&out.stdout));
    }
    assert_eq!(seen[1], seen[0], "{options}: cocoon against runc");
    nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH).unwrap();
    c.assert_clean();
    seen.swap_remove(0)
}

/// A kubelet-managed volume (configMap, secret, projected): files behind a `..data` symlink
/// that kubelet swaps atomically on update.
fn write_version(dir: &Path, version: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("key"), format!("{version}\n")).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("key").exists() {
        std::os::unix::fs::symlink("..data/key", dir.join("key")).unwrap();
    }
}

#[tokio::test]
async fn host_writes_and_a_data_symlink_swap_reach_a_running_container() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    let vol = host.path().join("vol");
    let cm = host.path().join("cm");
    std::fs::create_dir(&vol).unwrap();
    std::fs::create_dir(&cm).unwrap();
    write_version(&cm, "v1");

    // The container says it is ready, waits for the host's file, reads the config key again
    // and says what it saw.
    let script = "cat /cm/key > /vol/before; touch /vol/ready; \
                  i=0; while [ ! -f /vol/late.txt ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; \
                  cat /vol/late.txt /cm/key > /vol/seen.tmp; mv /vol/seen.tmp /vol/seen";
    let m1 = bind_mount(&vol, "/vol", "rbind:rw");
    let m2 = bind_mount(&cm, "/cm", "rbind:ro");
    let args: Vec<String> = [
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--mount",
        &m1,
        "--mount",
        &m2,
        IMAGE,
        "cm",
        "sh",
        "-c",
        script,
    ]
    .map(String::from)
    .to_vec();
    let runner = {
        let address = c.address.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Containerd::ctr_at(&address, &args)
        })
    };
    let t0 = Instant::now();
    while !vol.join("ready").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the container never got ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(vol.join("before")).unwrap(), "v1\n");
    write_version(&cm, "v2");
    std::fs::write(vol.join("late.txt"), "late\n").unwrap();
    let written = Instant::now();
    while !vol.join("seen").exists() {
        assert!(
            written.elapsed() < Duration::from_secs(30),
            "the container never saw the host's write"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen_after = written.elapsed();
    assert_eq!(
        std::fs::read_to_string(vol.join("seen")).unwrap(),
        "late\nv2\n"
    );
    assert!(
        seen_after < Duration::from_secs(2),
        "host write seen after {seen_after:?}"
    );
    let out = runner.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_clean();
}

#[tokio::test]
async fn a_missing_or_unshareable_source_fails_the_run_by_name() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    let sock_path = host.path().join("app.sock");
    let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    for (src, says) in [
        (host.path().join("missing"), "missing"),
        (sock_path.clone(), "unix socket"),
    ] {
        let m = bind_mount(&src, "/x", "rbind:rw");
        let args = [
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--mount",
            &m,
            IMAGE,
            "bad-vol",
            "true",
        ];
        let out = c.ctr(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{src:?} was accepted");
        assert!(err.contains(says), "error for {src:?}: {err}");
        // Nothing of the failed create is left for the next one.
        let _ = c.ctr(&["containers", "rm", "bad-vol"]);
    }
    c.assert_clean();
}

/// A mount destination that climbs out through a symlink in the image (`/escape` points at
/// `../../..`) lands inside the container's root, as under runc: not in the guest's own root
/// (the agent's), where the container would never see it.
#[tokio::test]
async fn a_destination_through_a_symlink_stays_inside_the_container() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("marker"), "inside\n").unwrap();
    for (rt, name) in [(RUNTIME, "cocoon"), ("io.containerd.runc.v2", "runc")] {
        let m = bind_mount(host.path(), "/escape/cocoon-vol", "rbind:ro");
        let id = format!("esc-{name}");
        let args = [
            "run",
            "--rm",
            "--runtime",
            rt,
            "--mount",
            &m,
            IMAGE,
            &id,
            "cat",
            "/cocoon-vol/marker",
        ];
        let out = c.ctr(&args);
        assert!(
            out.status.success(),
            "{name}: {}\ncontainerd log:\n{}",
            text(&out.stderr),
            c.log()
        );
        assert_eq!(text(&out.stdout), "inside\n", "{name}");
    }
    c.assert_clean();
}

/// The volume binds that the pod with run directory `run_dir` serves the guest: each mount
/// point below `/_volumes/` in virtiofsd's mount namespace, as a path the host can reach it by
/// (through `/proc/<virtiofsd>/root`), with its mount options. The host's own namespace must
/// hold none of them (runc's binds live in the container's namespace only).
fn served_volumes(run_dir: &Path) -> Vec<(String, String)> {
    let pid = vmm_driver::recorded_processes(run_dir)
        .into_iter()
        .find(|p| p.name == vmm_driver::VIRTIOFSD)
        .expect("virtiofsd is running")
        .pid;
    let on_host: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&*run_dir.to_string_lossy()) && l.contains("/_volumes/"))
        .map(str::to_owned)
        .collect();
    assert!(
        on_host.is_empty(),
        "volume binds in the host's namespace: {on_host:?}"
    );
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f[4].starts_with("/_volumes/")
                .then(|| (format!("/proc/{pid}/root{}", f[4]), f[5].to_owned()))
        })
        .collect()
}

/// SIGKILLs the detached task `id`, waits until it is STOPPED, deletes it and its container.
/// virtiofsd serves each volume from a bind in its own mount namespace: that bind must be
/// `nosuid,nodev`, and read-only where the volume is, or a read-only volume is writable and a
/// setuid file honoured through virtiofsd. Checked from the host, through virtiofsd's root,
/// where guest root's requests land. A source bound twice the same way is bound once.
#[tokio::test]
async fn the_export_copy_of_a_volume_is_as_restricted_as_its_host_bind() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    let ro = host.path().join("ro");
    let rw = host.path().join("rw");
    std::fs::create_dir(&ro).unwrap();
    std::fs::create_dir(&rw).unwrap();
    let m1 = bind_mount(&ro, "/ro", "rbind:ro");
    let m2 = bind_mount(&rw, "/rw", "rbind:rw");
    let m3 = bind_mount(&rw, "/rw-again", "rbind:rw");
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &m1,
        "--mount",
        &m2,
        "--mount",
        &m3,
        IMAGE,
        "exp",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));

    let mounts = served_volumes(&c.cocoon_state.join("exp"));
    assert_eq!(mounts.len(), 2, "one bind per source and mode: {mounts:?}");
    for (at, opts) in &mounts {
        let opts: Vec<&str> = opts.split(',').collect();
        assert!(
            opts.contains(&"nosuid") && opts.contains(&"nodev"),
            "{at}: {opts:?}"
        );
    }
    let (ro_at, rw_at): (Vec<_>, Vec<_>) = mounts
        .iter()
        .partition(|(_, o)| o.split(',').any(|x| x == "ro"));
    assert_eq!((ro_at.len(), rw_at.len()), (1, 1), "{mounts:?}");
    let err = std::fs::write(Path::new(&ro_at[0].0).join("planted"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    assert!(!ro.join("planted").exists());
    std::fs::write(Path::new(&rw_at[0].0).join("through-export"), "x").unwrap();
    assert!(rw.join("through-export").exists());

    c.kill_and_remove("exp");
    c.assert_clean();
}

/// With `rro`, what virtiofsd serves is read-only below the volume too: a guest root that
/// undid the container's `mount_setattr` still could not write through the share into a
/// mount below the volume.
#[tokio::test]
async fn the_export_copy_of_an_rro_volume_is_read_only_below_too() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    let host = tempfile::tempdir().unwrap();
    let (vol, sub) = volume_with_tmpfs_below(host.path(), "sub", nix::mount::MsFlags::MS_NOEXEC);
    let m = bind_mount(&vol, "/vol", "rbind:rro");
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &m,
        IMAGE,
        "rro",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "run -d: {}", text(&out.stderr));

    let mounts = served_volumes(&c.cocoon_state.join("rro"));
    let below: Vec<_> = mounts
        .iter()
        .filter(|(at, _)| at.ends_with("/sub"))
        .collect();
    assert_eq!(below.len(), 1, "{mounts:?}");
    let opts: Vec<&str> = below[0].1.split(',').collect();
    assert!(opts.contains(&"ro") && opts.contains(&"noexec"), "{opts:?}");
    let err = std::fs::write(Path::new(&below[0].0).join("planted"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    // The host's own mount stays as it was.
    std::fs::write(sub.join("host-writes"), "x").unwrap();

    c.kill_and_remove("rro");
    nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH).unwrap();
    c.assert_clean();
}
