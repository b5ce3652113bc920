//! Boots the real guest image under QEMU (KVM where usable, TCG elsewhere) and talks to the
//! real agent over hybrid vsock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_rootfs::initramfs::Initramfs;
use cocoon_shim::sandbox::Sandbox;
use cocoon_tests::{assert_no_leaks, busybox, gate, image_dir, test_config, Need};
use vmm_driver::config::Hypervisor;
use vmm_driver::{Config, VmSpec};

fn host_release() -> String {
    nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// The kernel release `make image` recorded.
fn manifest_release() -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image_dir().join("manifest.json")).unwrap()).unwrap();
    m["kernel_release"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn boots_the_guest_and_reads_its_kernel_then_leaves_nothing() {
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::Qemu)]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let cfg = test_config(state.path());
    let spec = VmSpec::from_config(&cfg, "boot");

    let sb = Sandbox::boot(&cfg, &spec).await.unwrap();
    let pids = sb.vm().pids();
    let names: Vec<&str> = pids.iter().map(|(n, _)| *n).collect();
    assert!(
        names.contains(&"qemu") && names.contains(&"virtiofsd"),
        "{names:?}"
    );
    let d = sb.guest_details().await.unwrap();
    let t = sb.timings;
    sb.shutdown().await.unwrap();

    assert!(
        d.kernel_release.ends_with("-cloud-amd64"),
        "not Debian's cloud kernel: {}",
        d.kernel_release
    );
    assert_eq!(
        d.kernel_release,
        manifest_release(),
        "guest kernel is not the installed image's"
    );
    assert_ne!(
        d.kernel_release,
        host_release(),
        "the guest reported the host kernel"
    );
    assert_eq!(d.machine, "x86_64");
    assert_eq!(d.online_cpus, cfg.vm.vcpus);
    assert!(
        d.mem_total_kib > 100 * 1024,
        "guest memory {} KiB",
        d.mem_total_kib
    );
    assert_eq!(
        d.shared_mount, "/run/cocoon/shared",
        "virtio-fs share not mounted"
    );
    assert!(
        d.loaded_modules.iter().any(|m| m == "virtiofs"),
        "{:?}",
        d.loaded_modules
    );
    println!(
        "guest {} (host {}): VMM up {:?}, agent connected {:?}, agent ready {:?}, guest uptime at ready {} ms",
        d.kernel_release,
        host_release(),
        t.vmm_started,
        t.agent_connected,
        t.agent_ready,
        d.agent_ready_uptime_ms
    );
    for (name, pid) in pids {
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
            "{name} (pid {pid}) still exists"
        );
    }
    assert_no_leaks(state.path());
}

/// Guest uptime the console shows for the first line containing `marker`, in ms.
fn console_uptime_ms(console: &str, marker: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains(marker))?;
    // After the host's wall-clock stamp (`vmm-driver/src/console.rs`).
    let stamp = line[line.find('[')?..]
        .strip_prefix('[')?
        .split(']')
        .next()?
        .trim();
    let (s, ms) = stamp.split_once('.')?;
    Some(s.parse::<u64>().ok()? * 1000 + ms.get(..3)?.parse::<u64>().ok()?)
}

/// The floor for boot time: the same kernel and initramfs, with /init powering off at once
/// (`cocoon.mode=bare`). Printed next to a full agent boot so the agent's own cost shows.
#[tokio::test]
async fn bare_boot_floor_against_agent_ready() {
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::Qemu)]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    // A kernel boot against a kernel boot: a VM template would skip what is measured.
    cfg.vm.template = vmm_driver::config::TemplateMode::Off;

    let mut spec = VmSpec::from_config(&cfg, "floor");
    spec.kernel_params = vec!["cocoon.mode=bare".into()];
    let t0 = Instant::now();
    let mut vm = vmm_driver::launch(&cfg, &spec).await.unwrap();
    let console_path = vm.console_log();
    let mut init_wall = None;
    let mut console = String::new();
    while t0.elapsed() < Duration::from_secs(60) {
        console = std::fs::read_to_string(&console_path).unwrap_or_default();
        if console.contains("bare boot: init reached") {
            init_wall = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        vm.wait_exit(Duration::from_secs(30)).await,
        "bare guest did not power off"
    );
    vm.stop().await.unwrap();
    let floor_wall = init_wall.unwrap_or_else(|| panic!("/init never ran; console:\n{console}"));
    let floor_uptime = console_uptime_ms(&console, "bare boot: init reached").unwrap();

    let spec = VmSpec::from_config(&cfg, "full");
    let sb = Sandbox::boot(&cfg, &spec).await.unwrap();
    let d = sb.guest_details().await.unwrap();
    let ready_wall = sb.timings.agent_ready;
    sb.shutdown().await.unwrap();

    // Kernel boot under TCG varies by ~100 ms from one boot to the next, so the agent's own
    // cost is best read inside one boot: from /init starting to the API listening.
    println!(
        "boot to init, bare /init (floor): {floor_wall:?} wall, {floor_uptime} ms guest uptime\n\
         boot to agent ready             : {ready_wall:?} wall, {} ms guest uptime\n\
         agent overhead, same boot       : {} ms guest uptime (/init at {} ms, listening at {} ms; goal < 100 ms)\n\
         agent ready minus floor         : {} ms wall (across two boots, noisy)",
        d.agent_ready_uptime_ms,
        d.agent_ready_uptime_ms - d.agent_start_uptime_ms,
        d.agent_start_uptime_ms,
        d.agent_ready_uptime_ms,
        ready_wall.as_millis() as i128 - floor_wall.as_millis() as i128,
    );
    assert!(
        d.agent_start_uptime_ms > 0 && d.agent_ready_uptime_ms >= d.agent_start_uptime_ms,
        "agent reported start {} ms, ready {} ms",
        d.agent_start_uptime_ms,
        d.agent_ready_uptime_ms
    );
    assert_no_leaks(state.path());
}

/// An initramfs whose /init prints numbered lines and then never answers.
fn silent_initramfs(dir: &Path) -> PathBuf {
    let script = "#!/bin/sh\ni=1\nwhile [ $i -le 30 ]; do echo \"silent-guest line $i\"; i=$((i+1)); done\nwhile :; do /bin/busybox sleep 3600; done\n";
    let mut img = Initramfs::new();
    img.file("init", 0o755, script.as_bytes().to_vec()).unwrap();
    img.file("bin/busybox", 0o755, std::fs::read(busybox()).unwrap())
        .unwrap();
    img.symlink("bin/sh", "busybox").unwrap();
    img.char_dev("dev/console", 0o600, 5, 1).unwrap();
    let path = dir.join("silent.img");
    std::fs::write(&path, img.write(Vec::new()).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_guest_that_never_answers_fails_with_its_console_tail() {
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::Qemu)]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    cfg.initramfs = silent_initramfs(images.path());
    cfg.agent.connect_timeout_ms = 8_000;

    let err = Sandbox::boot(&cfg, &VmSpec::from_config(&cfg, "silent"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not answer within"), "{err}");
    assert!(
        err.contains("silent-guest line 30"),
        "console tail missing: {err}"
    );
    // Exactly the last 20 lines: line 11 is in, line 10 is out.
    assert!(
        err.contains("silent-guest line 11\n") && !err.contains("silent-guest line 10\n"),
        "{err}"
    );
    assert_no_leaks(state.path());
}

#[tokio::test]
async fn a_guest_that_dies_fails_with_its_console_tail() {
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::Qemu)]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    // No /init and no root device: the kernel panics, and panic=-1 + -no-reboot ends QEMU.
    let mut img = Initramfs::new();
    img.char_dev("dev/console", 0o600, 5, 1).unwrap();
    cfg.initramfs = images.path().join("empty.img");
    std::fs::write(&cfg.initramfs, img.write(Vec::new()).unwrap()).unwrap();

    let err = Sandbox::boot(&cfg, &VmSpec::from_config(&cfg, "dies"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("VM exited before its agent answered"), "{err}");
    assert!(err.contains("Kernel panic"), "console tail missing: {err}");
    assert_no_leaks(state.path());
}

async fn expect_launch_error(cfg: &Config, state: &Path, needles: &[&str]) {
    let err = Sandbox::boot(cfg, &VmSpec::from_config(cfg, "bad"))
        .await
        .unwrap_err()
        .to_string();
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
    assert_no_leaks(state);
}

#[tokio::test]
async fn missing_kernel_or_initramfs_says_make_image() {
    let Some(_gate) = gate(&[]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    cfg.kernel = "/nonexistent/vmlinuz".into();
    expect_launch_error(
        &cfg,
        state.path(),
        &["guest kernel", "/nonexistent/vmlinuz", "make image"],
    )
    .await;
    let mut cfg = test_config(state.path());
    cfg.initramfs = "/nonexistent/initramfs.img".into();
    expect_launch_error(
        &cfg,
        state.path(),
        &[
            "guest initramfs",
            "/nonexistent/initramfs.img",
            "make image",
        ],
    )
    .await;
}

#[tokio::test]
async fn missing_helper_binaries_say_make_setup() {
    let Some(_gate) = gate(&[]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    cfg.paths.qemu = "/nonexistent/qemu-system-x86_64".into();
    expect_launch_error(
        &cfg,
        state.path(),
        &["qemu-system-x86_64 is not installed", "make setup"],
    )
    .await;

    let mut cfg = test_config(state.path());
    cfg.paths.virtiofsd = "no-such-virtiofsd".into();
    expect_launch_error(
        &cfg,
        state.path(),
        &[
            "virtiofsd is not installed",
            "no-such-virtiofsd",
            "make setup",
        ],
    )
    .await;

    let mut cfg = test_config(state.path());
    cfg.vsock = vmm_driver::config::VsockMode::Hybrid;
    cfg.paths.vhost_device_vsock = "/nonexistent/vhost-device-vsock".into();
    expect_launch_error(
        &cfg,
        state.path(),
        &["vhost-device-vsock is not installed", "make setup"],
    )
    .await;
}

#[tokio::test]
async fn config_files_with_unknown_keys_or_bad_values_are_refused() {
    let Some(_gate) = gate(&[]).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "hypervisor = \"qemu\"\n[vm]\nvcpus = 1\nmemroy_mib = 512\n",
            vec!["unknown field `memroy_mib`", "memory_mib"],
        ),
        (
            "accel = \"fast\"\n",
            vec!["accel", "fast", "auto", "kvm", "tcg"],
        ),
        ("[vm]\nvcpus = \"two\"\n", vec!["vcpus", "two"]),
        (
            "[vm]\nmemory_mib = 32\n",
            vec!["vm.memory_mib", "32", "out of range"],
        ),
        (
            "hypervisor = \"firecracker\"\n",
            vec!["firecracker", "qemu", "cloud-hypervisor"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("config-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        for n in needles {
            assert!(
                err.contains(n),
                "config {text:?}: error should mention `{n}`: {err}"
            );
        }
    }
}

/// `containerd-shim-cocoon-v2 check` boots a pod VM from the config, reports on it, and says
/// when the accelerator (TCG) is no security boundary.
#[tokio::test]
async fn check_reports_the_guest_and_warns_when_tcg_is_no_boundary() {
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::Qemu)]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let toml = etc.path().join("cocoon.toml");
    cocoon_tests::write_cocoon_toml(&toml, Hypervisor::Qemu, state.path());
    let out =
        std::process::Command::new(cocoon_tests::shim_dir().join("containerd-shim-cocoon-v2"))
            .arg("check")
            .env("COCOON_CONFIG", &toml)
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("guest kernel: {}", manifest_release())),
        "{text}"
    );
    assert!(text.contains("shared dir  : /run/cocoon/shared"), "{text}");
    let tcg = vmm_driver::accel::choose(
        vmm_driver::config::Accel::Auto,
        &vmm_driver::accel::HostFacts::probe(),
    )
    .unwrap()
    .0 == vmm_driver::accel::Chosen::Tcg;
    assert_eq!(
        text.contains("TCG is not a security boundary"),
        tcg,
        "{text}"
    );
    assert_no_leaks(state.path());
}

/// The run dir is root's alone, the logs are private, and QEMU runs under its seccomp sandbox
/// as an unprivileged user without capabilities.
#[tokio::test]
async fn the_run_dir_is_private_and_qemu_and_vhost_device_vsock_are_unprivileged() {
    use std::os::unix::fs::PermissionsExt;
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::Qemu)]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut cfg = test_config(state.path());
    // The channel with a daemon of its own, whose privileges are checked below.
    cfg.vsock = vmm_driver::config::VsockMode::Hybrid;
    let spec = VmSpec::from_config(&cfg, "private");
    let sb = Sandbox::boot(&cfg, &spec).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&spec.run_dir), 0o700);
    for log in [
        "console.log",
        "qemu.log",
        "virtiofsd.log",
        "vhost-device-vsock.log",
    ] {
        assert_eq!(mode(&spec.run_dir.join(log)), 0o600, "{log}");
    }
    let status_of = |name: &str| {
        let (_, pid) = *sb.vm().pids().iter().find(|(n, _)| *n == name).unwrap();
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
    };
    let field_of = |status: &str, k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let status = status_of("qemu");
    let field = |k: &str| field_of(&status, k);
    assert_eq!(field("Seccomp:"), "2", "QEMU runs without a seccomp filter");
    // Root only to set up: real, effective, saved and filesystem ids are all unprivileged,
    // and no capability is left.
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = field(key)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(ids.len(), 4, "{key} {ids:?}");
        assert!(
            ids.iter().all(|id| *id >= 0x7000_0000),
            "QEMU's {key} {ids:?}"
        );
    }
    assert_eq!(
        field("CapEff:"),
        "0000000000000000",
        "QEMU kept capabilities"
    );
    assert_eq!(
        field("CapPrm:"),
        "0000000000000000",
        "QEMU kept capabilities"
    );
    // vhost-device-vsock needs no privilege at all: its own unprivileged id, no capability
    // (bounding set included), no way to gain one.
    let vsockd = status_of("vhost-device-vsock");
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = field_of(&vsockd, key)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            ids.len() == 4 && ids.iter().all(|id| *id >= 0x7000_0000),
            "vhost-device-vsock's {key} {ids:?}"
        );
    }
    for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            field_of(&vsockd, key),
            "0000000000000000",
            "vhost-device-vsock {key}"
        );
    }
    assert_eq!(field_of(&vsockd, "NoNewPrivs:"), "1");
    assert_eq!(field_of(&vsockd, "Groups:"), "");
    // virtiofsd stays root (it creates files as any uid the guest names) but keeps only the
    // file capabilities: CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SETGID,
    // SETUID, MKNOD, SETFCAP; nothing like SYS_ADMIN, and an empty bounding set.
    const FILE_CAPS: u64 = 0x8800_00df;
    let (_, fs) = *sb
        .vm()
        .pids()
        .iter()
        .find(|(n, _)| *n == "virtiofsd")
        .unwrap();
    let mut procs = vec![i32::try_from(fs).unwrap()];
    procs.extend(vmm_driver::children_of(fs));
    assert!(procs.len() >= 2, "virtiofsd's sandboxed child: {procs:?}");
    for pid in procs {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caps = |k: &str| u64::from_str_radix(&field_of(&st, k), 16).unwrap();
        assert_eq!(caps("CapEff:") & !FILE_CAPS, 0, "virtiofsd {pid} CapEff");
        assert_eq!(caps("CapPrm:") & !FILE_CAPS, 0, "virtiofsd {pid} CapPrm");
        assert_eq!(caps("CapBnd:"), 0, "virtiofsd {pid} CapBnd");
    }
    sb.shutdown().await.unwrap();
    assert_no_leaks(state.path());
}
