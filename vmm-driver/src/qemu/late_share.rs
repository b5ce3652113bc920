//! The virtio-fs share plugged into a running VM (issue #29). A pod whose first container binds
//! no host directory and has its rootfs as layer disks starts without virtiofsd (`VmSpec::share`
//! false): the guest's files are guest copies, and its key comes by fw_cfg. The first
//! container that needs the share (a host directory, a rootfs that stays on the share) gets it
//! here, once: virtiofsd starts sandboxed as at a boot, and its device is hot-plugged on the
//! root port that a template pod's share uses too.
//!
//! QEMU runs unprivileged by then (`-runas`) and can't reach virtiofsd's socket in the `0700`
//! run directory, so the driver connects to it and hands QEMU the connected socket (`getfd`,
//! then a `chardev-add` on that fd), as it hands over tap fds.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use serde_json::json;
use tokio::net::UnixStream;

use super::cmdline::FS_CHARDEV;
use super::qmp::Qmp;
use crate::config::Config;
use crate::daemon::{wait_for_socket, Daemon, Watched, DAEMON_READY, STOP_GRACE};
use crate::error::{Error, Result};
use crate::run_dir::RunDir;
use crate::supervise::Supervisor;
use crate::virtiofsd::{spawn_virtiofsd, VIRTIOFS_TAG};

/// The name QEMU knows the connected socket by, between `getfd` and `chardev-add`.
const FS_FD_NAME: &str = "fs0sock";

/// A VM's share, plugged in on demand.
#[derive(Debug)]
pub(crate) struct LateShare {
    vm: String,
    cfg: Config,
    dir: RunDir,
    virtiofsd: PathBuf,
    qmp: Arc<tokio::sync::Mutex<Qmp<UnixStream>>>,
    qemu: Watched,
    /// One attach at a time; the second caller finds the share there.
    attaching: tokio::sync::Mutex<()>,
    attached: StdMutex<Option<(Daemon, Option<Supervisor>)>>,
    /// Why the share can't be plugged into this VM: its RAM is a private copy-on-write clone
    /// of the template's, which no vhost-user daemon can map.
    refused: Option<String>,
}

impl LateShare {
    pub(crate) fn new(
        vm: &str,
        cfg: &Config,
        dir: RunDir,
        virtiofsd: PathBuf,
        qmp: Arc<tokio::sync::Mutex<Qmp<UnixStream>>>,
        qemu: Watched,
    ) -> LateShare {
        LateShare {
            vm: vm.to_owned(),
            cfg: cfg.clone(),
            dir,
            virtiofsd,
            qmp,
            qemu,
            attaching: tokio::sync::Mutex::new(()),
            attached: StdMutex::new(None),
            refused: None,
        }
    }

    /// The share of a VM whose RAM is the template's, copy-on-write: every attach fails with
    /// an error that says why and what to change.
    pub(crate) fn refused(mut self) -> LateShare {
        self.refused = Some(format!(
            "pod VM {} maps the VM template's RAM copy-on-write, which virtiofsd can't map, so a \
             later container can't bind a host directory into it; give the pod's first container \
             the annotation io.cocoon.share=always, or set [vm] clone_ram = \"off\" (or share = \
             \"always\") in the Cocoon config",
            self.vm
        ));
        self
    }

    /// virtiofsd's pid, once attached.
    pub(crate) fn pid(&self) -> Option<u32> {
        let a = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        a.as_ref().map(|(d, _)| d.pid())
    }

    /// Stops and reaps virtiofsd, if it was started.
    pub(crate) async fn stop(&self) -> Result<()> {
        let taken = self
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((mut d, supervisor)) = taken else {
            return Ok(());
        };
        drop(supervisor);
        d.stop(STOP_GRACE).await.map(drop)
    }

    async fn plug(&self, sock: &std::path::Path) -> Result<()> {
        let conn = connect_when_listening(sock).await?;
        let mut qmp = self.qmp.lock().await;
        qmp.getfd(FS_FD_NAME, conn.as_fd()).await?;
        let backend = json!({"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": FS_FD_NAME}}, "server": false}});
        qmp.execute(
            "chardev-add",
            Some(json!({"id": FS_CHARDEV, "backend": backend})),
        )
        .await?;
        let device = super::cmdline::fs_device_args(VIRTIOFS_TAG);
        if let Err(e) = qmp.execute("device_add", Some(device)).await {
            let _ = qmp
                .execute("chardev-remove", Some(json!({"id": FS_CHARDEV})))
                .await;
            return Err(e);
        }
        Ok(())
    }
}

/// How long virtiofsd may take from creating its socket to listening on it.
const LISTEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects to virtiofsd's socket. [`wait_for_socket`] sees the file once virtiofsd has bound
/// it, a moment before it listens (a connect then is refused: seen under load in the
/// lean-pods suite); it can't probe by connecting, since virtiofsd serves one connection.
async fn connect_when_listening(sock: &std::path::Path) -> Result<std::os::unix::net::UnixStream> {
    let t0 = Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(c) => return Ok(c),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < LISTEN_WAIT =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => return Err(Error::io(format!("connect to {}", sock.display()), e)),
        }
    }
}

#[async_trait]
impl crate::ShareHotplug for LateShare {
    async fn attach(&self) -> Result<()> {
        if let Some(why) = &self.refused {
            return Err(Error::ShareRefused(why.clone()));
        }
        let _one = self.attaching.lock().await;
        if self.pid().is_some() {
            return Ok(());
        }
        let t0 = Instant::now();
        let (mut fs, sock) = spawn_virtiofsd(&self.cfg, &self.dir, &self.virtiofsd)?;
        let plugged = match wait_for_socket(&mut fs, &sock, DAEMON_READY).await {
            Ok(()) => self.plug(&sock).await,
            Err(e) => Err(e),
        };
        if let Err(e) = plugged {
            if let Err(stop) = fs.stop(STOP_GRACE).await {
                log::warn!("VM {}: stopping virtiofsd: {stop}", self.vm);
            }
            return Err(e);
        }
        // From now on a dead virtiofsd takes the VM down, as one started at boot does.
        let supervisor = Supervisor::start(&self.vm, &self.qemu, &[fs.watched()])
            .map_err(|e| log::warn!("VM {}: virtiofsd is not supervised: {e}", self.vm))
            .ok();
        log::info!(
            "VM {}: virtio-fs share plugged in on demand in {} ms (virtiofsd pid {})",
            self.vm,
            t0.elapsed().as_millis(),
            fs.pid()
        );
        *self.attached.lock().unwrap_or_else(PoisonError::into_inner) = Some((fs, supervisor));
        Ok(())
    }
}
