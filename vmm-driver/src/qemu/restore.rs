//! Starting a pod's QEMU from the VM template (`template.rs`) instead of booting the kernel.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use command_fds::{CommandFdExt, FdMapping};
use serde_json::json;
use tokio::process::Command;

use super::cmdline::{self, QemuLaunch, TemplateRole, VSOCK_CHARDEV, VSOCK_PORT};
use super::{disks, hotplug, template, template_ram, Binaries, QemuVm};
use crate::config::Config;
use crate::daemon::{tail_lines, Daemon};
use crate::error::{Error, Result};
use crate::{NicHotplug, VmSpec};

/// The fd a restoring QEMU finds the pod's guest RAM memfd on. A restore plugs its NICs over
/// QMP, so no tap fd is passed at start.
const RAM_FD: i32 = 3;
/// How long a QEMU whose QMP session broke during the restore gets to exit.
const STATE_REFUSED_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The template a pod shaped like `cold` (the launch a kernel boot would use) restores from.
fn template_launch(cold: &QemuLaunch) -> QemuLaunch {
    let mut t = cold.clone();
    t.template = Some(TemplateRole::Build);
    t.hotplug_slots = template::NIC_PORTS;
    t.nics = vec![];
    t.cmdline = format!("{} {}", cold.cmdline, cocoon_protocol::TEMPLATE_PARAM);
    t
}

/// Why a pod restored from the template needs RAM of its own; None when it can map the
/// template's copy-on-write. Shared RAM is what vhost-user daemons need: a clone's pages are
/// private to its QEMU, so a pod with (or that may later get) a vhost-user device gets a copy.
fn own_ram_copy(
    cfg: &Config,
    spec: &VmSpec,
    cold: &QemuLaunch,
    version: super::version::QemuVersion,
) -> Option<String> {
    if cfg.vm.clone_ram == crate::config::CloneRam::Off {
        Some("[vm] clone_ram = \"off\"".into())
    } else if !matches!(cold.vsock, cmdline::VsockDevice::Serial(_)) {
        Some("the agent's channel is vhost-user vsock; vsock = \"serial\" needs none".into())
    } else if cold.virtiofs_socket.is_some() {
        Some("it has the virtio-fs share".into())
    } else if spec.later_containers {
        Some(
            "more containers may join it (a pod sandbox), and one may bind a host directory".into(),
        )
    } else if !version.maps_read_only_ram_private() {
        Some(format!(
            "QEMU {version} can't map a file it opened read-only as private RAM; 8.2 and later can"
        ))
    } else {
        None
    }
}

/// Which template a pod of `cfg`'s default shape uses, for `check`.
pub async fn default_identity(cfg: &Config) -> Result<template::Identity> {
    let qemu = crate::daemon::resolve_binary("qemu-system-x86_64", "qemu", &cfg.paths.qemu)?;
    let version = super::version::probe(&qemu, &cfg.template_dir).await?;
    let spec = VmSpec::from_config(cfg, "check");
    let (accel, _) = crate::accel::choose(cfg.accel, &crate::accel::HostFacts::probe())?;
    let cold = super::shaped(cfg, &spec, accel, version);
    Ok(template::identity(
        &cfg.template_dir,
        &qemu,
        &template_launch(&cold),
    ))
}

impl QemuVm {
    /// Restores the template into a new QEMU (making the template first if needed), plugs in
    /// the pod's vsock, share and NICs, and lets the guest run. The daemons already run.
    /// Problems with the template itself are [`Error::Template`], on which the caller boots
    /// the kernel instead.
    pub(super) async fn restore(
        &mut self,
        cfg: &Config,
        spec: &VmSpec,
        bins: &Binaries,
        cold: QemuLaunch,
    ) -> Result<()> {
        let t0 = Instant::now();
        let tl = template_launch(&cold);
        let id = template::identity(&cfg.template_dir, &bins.qemu, &tl);
        let state = template::ensure(
            &id,
            &bins.qemu,
            &tl,
            &self.dir,
            std::time::Duration::from_millis(cfg.agent.connect_timeout_ms),
            cfg.vmm.api_timeout(),
        )
        .await?;
        let t_template = t0.elapsed();

        let mut rl = tl;
        rl.template = Some(TemplateRole::Restore);
        rl.cmdline = cold.cmdline.clone();
        let mut q = Command::new(&bins.qemu);
        let own_copy = own_ram_copy(cfg, spec, &cold, bins.version);
        let filling = match &own_copy {
            // A clone: QEMU maps the template's RAM file itself, read-only and private.
            None => {
                log::info!("VM {}: RAM copy-on-write from the template's", spec.id);
                rl.ram_file = Some(id.ram());
                rl.ram_private = true;
                self.ram_cloned = true;
                None
            }
            // The pod's RAM: a memfd QEMU maps as a file, filled from the template's RAM while
            // QEMU starts (`template_ram.rs`).
            Some(why) => {
                log::info!("VM {}: RAM of its own ({why})", spec.id);
                let ram = template_ram::memfd(rl.memory_bytes())?;
                let for_qemu = ram
                    .try_clone()
                    .map_err(|e| Error::Template(format!("dup the guest RAM memfd: {e}")))?;
                let ram_file = id.ram();
                rl.ram_file = Some(format!("/proc/self/fd/{RAM_FD}").into());
                q.fd_mappings(vec![FdMapping {
                    parent_fd: for_qemu,
                    child_fd: RAM_FD,
                }])
                .map_err(|e| Error::io("hand QEMU the guest RAM", std::io::Error::other(e)))?;
                Some(tokio::task::spawn_blocking(move || {
                    template_ram::fill(&ram_file, &ram)
                }))
            }
        };
        q.args(cmdline::qemu_args(&rl));
        log::debug!("VM {}: {:?}", spec.id, q.as_std());
        self.qemu = Some(self.dir.spawn("qemu", q, spec.netns.as_deref())?);
        let mut qmp = self
            .connect_qmp(&rl.qmp_socket, cfg.vmm.api_timeout())
            .await?;
        let copied = match filling {
            Some(f) => f
                .await
                .map_err(|e| Error::Template(format!("filling the guest RAM: {e}")))??,
            None => 0,
        };
        template::set_ignore_shared(&mut qmp).await?;
        let file = std::fs::File::open(&state)
            .map_err(|e| Error::Template(format!("open {}: {e}", state.display())))?;
        qmp.getfd("template", file.as_fd()).await?;
        qmp.execute("migrate-incoming", Some(json!({"uri": "fd:template"})))
            .await
            .map_err(|e| Error::Template(format!("migrate-incoming: {e}")))?;
        loop {
            // QEMU exits when it refuses the state; its QMP socket may close first.
            let status = match qmp.status().await {
                Ok(s) => s,
                Err(e) => {
                    crate::daemon::exited_within(self.qemu.as_mut(), STATE_REFUSED_EXIT).await;
                    e.to_string()
                }
            };
            if let Some(exit) = self.qemu.as_mut().and_then(Daemon::try_exited) {
                // This template is no good to anyone.
                id.discard_refused(&file);
                return Err(Error::Template(format!(
                    "QEMU could not restore {} ({exit}): {}; it will be made again",
                    id.dir.display(),
                    tail_lines(&self.dir.path("qemu.log"), 5).trim()
                )));
            }
            match status.as_str() {
                "paused" | "running" => break,
                "inmigrate" => {}
                other => {
                    return Err(Error::Template(format!(
                        "restoring {}: {other}",
                        id.dir.display()
                    )))
                }
            }
            if t0.elapsed() > t_template + template::RESTORE_LIMIT {
                return Err(Error::Template(format!(
                    "restoring {} took longer than {:?}",
                    id.dir.display(),
                    template::RESTORE_LIMIT
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(file);
        let t_restored = t0.elapsed();
        // The serial channel is in the template already; vhost-user vsock is plugged now.
        if matches!(cold.vsock, cmdline::VsockDevice::VhostUser(_)) {
            qmp.execute(
                "device_add",
                Some(json!({"driver": "vhost-user-vsock-pci", "id": "vsock", "chardev": VSOCK_CHARDEV, "bus": VSOCK_PORT})),
            )
            .await?;
        }
        if cold.virtiofs_socket.is_some() {
            qmp.execute(
                "device_add",
                Some(cmdline::fs_device_args(&cold.virtiofs_tag)),
            )
            .await?;
        }
        let qmp = Arc::new(tokio::sync::Mutex::new(qmp));
        let hp = Arc::new(hotplug::QemuHotplug::new(qmp.clone(), template::NIC_PORTS));
        for nic in &spec.nics {
            hp.add_nic(nic).await?;
        }
        qmp.lock().await.execute("cont", None).await?;
        self.hotplug = Some(hp);
        self.disks = Some(Arc::new(disks::QemuDisks::new(qmp.clone())));
        self.qmp = Some(qmp);
        log::info!(
            "VM {}: restored from template {} (template {} ms, state loaded {} ms, devices in {} ms; {} MiB of RAM copied)",
            spec.id,
            id.dir.display(),
            t_template.as_millis(),
            (t_restored - t_template).as_millis(),
            (t0.elapsed() - t_restored).as_millis(),
            copied >> 20
        );
        self.restored_from = Some(id.dir.clone());
        Ok(())
    }
}
