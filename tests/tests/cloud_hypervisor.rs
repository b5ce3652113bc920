//! The Cloud Hypervisor backend against the real `cloud-hypervisor` binary, when one is on
//! PATH. Its API path (create, info, lifecycle, hotplug, errors) runs wherever the VMM starts,
//! which needs only `/dev/kvm` to exist; booting to the agent and `ctr run` need a usable KVM.
//! Whatever can't run here says why it skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;

use cocoon_shim::sandbox::Sandbox;
use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::{assert_no_leaks, gate, test_config, Need};
use vmm_driver::accel::HostFacts;
use vmm_driver::cloud_hypervisor::api::{DiskConfig, VmResize, VmState};
use vmm_driver::cloud_hypervisor::{check_host, ChVm};
use vmm_driver::config::Hypervisor;
use vmm_driver::{Config, Error, VmSpec, Vmm};

fn ch_config(state: &Path) -> Config {
    Config {
        hypervisor: Hypervisor::CloudHypervisor,
        ..test_config(state)
    }
}

#[tokio::test]
async fn api_create_info_lifecycle_hotplug_and_errors() {
    let Some(_gate) = gate(&[Need::ChVmm]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let cfg = ch_config(state.path());
    let spec = VmSpec::from_config(&cfg, "chapi");
    let mut vm = ChVm::start(&cfg, &spec).await.unwrap();
    let names: Vec<&str> = vm.pids().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["cloud-hypervisor", "virtiofsd"]);
    let api = vm.api().clone();

    let ping = api.ping().await.unwrap();
    assert!(!ping.version.is_empty());
    println!(
        "cloud-hypervisor {} ({:?}) serving {}",
        ping.version,
        ping.build_version,
        api.socket().display()
    );
    let e = api.info().await.unwrap_err();
    assert!(
        matches!(&e, Error::ChApi { endpoint: "vm.info", status: 404, message } if message.contains("not created")),
        "{e}"
    );

    let body = vm.vm_config(&cfg, &spec);
    api.create(&body).await.unwrap();
    let info = api.info().await.unwrap();
    assert_eq!(info.state, VmState::Created);
    assert_eq!(
        info.config.memory, body.memory,
        "CH kept the memory we asked for"
    );
    assert_eq!(info.config.vsock, body.vsock);
    assert_eq!(info.config.fs, body.fs);
    assert_eq!(info.config.payload, body.payload);
    let e = api.create(&body).await.unwrap_err().to_string();
    assert!(
        e.contains("vm.create") && e.contains("already created"),
        "{e}"
    );

    api.boot().await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Running);
    api.pause().await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Paused);
    let e = api.pause().await.unwrap_err().to_string();
    assert!(e.contains("vm.pause"), "{e}");
    api.resume().await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Running);
    api.resize(&VmResize {
        desired_vcpus: Some(2),
        ..VmResize::default()
    })
    .await
    .unwrap();

    let img = scratch.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = DiskConfig {
        path: img,
        readonly: true,
        id: Some("d0".into()),
    };
    let added = api.add_disk(&disk).await.unwrap().unwrap();
    assert_eq!(added.id, "d0");
    let e = api.add_disk(&disk).await.unwrap_err().to_string();
    assert!(e.contains("vm.add-disk"), "a duplicate id is refused: {e}");
    let missing = DiskConfig {
        path: scratch.path().join("missing.img"),
        ..DiskConfig::default()
    };
    let e = api.add_disk(&missing).await.unwrap_err().to_string();
    assert!(
        e.contains("vm.add-disk") && e.contains("missing.img"),
        "CH's own text reaches the error: {e}"
    );

    println!("create, info, boot, pause, resume, resize, add-disk and their errors: done");
    let pids = vm.pids();
    vm.stop().await.unwrap();
    for (name, pid) in pids {
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
            "{name} (pid {pid}) still exists"
        );
    }
    assert_no_leaks(state.path());
}

#[tokio::test]
async fn boots_to_the_agent_or_refuses_up_front() {
    let state = tempfile::tempdir().unwrap();
    let cfg = ch_config(state.path());
    let spec = VmSpec::from_config(&cfg, "chboot");
    if check_host(&cfg, &HostFacts::probe()).is_err() {
        // Where CH can't run, launch says so, with the way out, before starting anything; then
        // the gate skips the boot, with the same reason.
        let e = vmm_driver::launch(&cfg, &spec)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cloud-hypervisor") && e.contains("hypervisor = \"qemu\""),
            "{e}"
        );
        assert_no_leaks(state.path());
    }
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::CloudHypervisor)]).await else {
        return;
    };
    let sb = Sandbox::boot(&cfg, &spec).await.unwrap();
    let names: Vec<&str> = sb.vm().pids().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["cloud-hypervisor", "virtiofsd"]);
    let d = sb.guest_details().await.unwrap();
    println!(
        "cloud-hypervisor: guest {}, agent ready at guest uptime {} ms, timings {:?}",
        d.kernel_release, d.agent_ready_uptime_ms, sb.timings
    );
    sb.shutdown().await.unwrap();
    assert!(
        d.kernel_release.ends_with("-cloud-amd64"),
        "{}",
        d.kernel_release
    );
    assert_eq!(d.online_cpus, cfg.vm.vcpus);
    assert_eq!(d.shared_mount, "/run/cocoon/shared");
    assert_no_leaks(state.path());
}

#[tokio::test]
async fn ctr_run_with_cloud_hypervisor() {
    let Some(_gate) = gate(&[Need::Guest(Hypervisor::CloudHypervisor)]).await else {
        return;
    };
    let c = Containerd::start_with(Hypervisor::CloudHypervisor);
    c.import_test_image();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "ch-uname",
        "uname",
        "-r",
    ]);
    assert!(
        out.status.success(),
        "ctr run failed: {}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log()
    );
    let guest = String::from_utf8_lossy(&out.stdout);
    assert!(guest.trim().ends_with("-cloud-amd64"), "{guest:?}");
    c.assert_clean();
}

#[tokio::test]
async fn a_missing_or_dying_vmm_fails_clearly_and_leaves_nothing() {
    let Some(_gate) = gate(&[]).await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut cfg = ch_config(state.path());
    let spec = VmSpec::from_config(&cfg, "chfail");
    cfg.paths.cloud_hypervisor = "/nonexistent/cloud-hypervisor".into();
    let e = ChVm::start(&cfg, &spec).await.unwrap_err().to_string();
    assert!(
        e.contains("/nonexistent/cloud-hypervisor")
            && e.contains("paths.cloud_hypervisor")
            && e.contains("hypervisor = \"qemu\""),
        "{e}"
    );
    // A VMM that exits at once: its exit is reported and virtiofsd, started beside it, reaped.
    cfg.paths.cloud_hypervisor = "/bin/false".into();
    let e = ChVm::start(&cfg, &spec).await.unwrap_err().to_string();
    assert!(e.contains("cloud-hypervisor") && e.contains("exit"), "{e}");
    assert_no_leaks(state.path());
}
