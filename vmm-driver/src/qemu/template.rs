//! VM templates: a guest booted once, saved, and restored into every pod of the same shape
//! instead of booting a kernel each time (issue #16).
//!
//! Under TCG the kernel's boot is most of a pod's start (~1.8 s to the agent); a restore has
//! the guest running again in ~0.3 s. The template is a booted guest whose agent is up with
//! every module loaded but which has no vsock or virtio-fs device: vhost-user-vsock can't be
//! migrated, and each pod needs its own share and key. Those devices (and the pod's NICs) are
//! hot-plugged into free root ports after the restore, and the agent picks them up.
//!
//! The template holds nothing pod-specific or secret: no key, no share, no network. Each pod's
//! clock and kernel RNG are refreshed by the host right after the agent answers (the agent's
//! `Refresh` call), since they are the template's at restore.
//!
//! Saving is a migration of the stopped template into a file (`migrate fd:`) and a restore is
//! `-incoming defer` + `migrate-incoming fd:`: both go through fds the driver opens, so the
//! unprivileged, seccomp-confined QEMU (`-runas`, `spawn=deny`) needs neither a path nor a
//! shell. Both sides set `x-ignore-shared`, so the saved state is the devices' alone; guest RAM
//! is a file of its own beside it, copied into each pod's own shared memfd
//! (`template_ram.rs`): the vhost-user daemons must map a pod's RAM, so it can't be the
//! template's pages shared copy-on-write.
//!
//! A template lives in `<template_dir>/<hash>/` (root only). The hash covers everything the
//! saved state depends on: the QEMU command line of the template (shape, kernel command line,
//! devices), and the kernel, initramfs and QEMU binary by path, size, mtime and inode. Any
//! change names a different template, which is built on first use; templates whose inputs
//! changed on disk are removed when the next one is built. Builders take a lock, so pods that
//! start together build one template once.

use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use super::cmdline::{qemu_args, QemuLaunch, TemplateRole, VsockDevice};
use super::version::fingerprint;
use crate::console::{ConsoleRelay, Forward, Output, CONSOLE_CAP};
use crate::daemon::{tail_lines, Daemon, STOP_GRACE};
use crate::error::{Error, Result};
use crate::run_dir::RunDir;

/// Root ports a template VM keeps free for NICs: a pod with more NICs boots cold.
pub const NIC_PORTS: u8 = 4;
/// Bumped whenever what a template holds changes in a way its command line does not show
/// (2: the state is saved without guest RAM's zero pages; 3: guest RAM in its own file; 4: its
/// console stamped with host time, as `cocoon logs` shows it first for every pod of it).
const FORMAT: u32 = 4;
/// How long a pod waits for another pod's build of the same template before it boots cold.
const BUILD_WAIT: Duration = Duration::from_secs(90);
/// How long saving the stopped template may take (its devices' state: ~400 KB).
const SAVE_LIMIT: Duration = Duration::from_secs(60);
/// How long loading the state into a new QEMU may take.
pub(crate) const RESTORE_LIMIT: Duration = Duration::from_secs(30);
/// No migration bandwidth cap: QEMU's default (32 MiB/s) throttles even a small state.
const UNCAPPED_BYTES_PER_S: u64 = 1 << 40;

/// Which template a launch uses, and what it was derived from.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `<template_dir>/<hash>`.
    pub dir: PathBuf,
    /// The text the hash is taken of.
    key: String,
    /// Files the template depends on, with their fingerprints when it was made.
    inputs: Vec<(PathBuf, String)>,
}

/// What `meta.json` records next to the saved state; written last, so a template without it
/// is incomplete.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    key: String,
    inputs: Vec<(PathBuf, String)>,
    state_bytes: u64,
    /// The RAM file's length: the VM's memory.
    ram_bytes: u64,
    build_ms: u64,
    built_unix: u64,
}

/// `failed.json` in a template's directory: why making it failed, so that the pods after
/// don't each wait for the same failure (a broken guest image) before booting the kernel.
#[derive(Debug, Serialize, Deserialize)]
struct Failed {
    inputs: Vec<(PathBuf, String)>,
    reason: String,
    at_unix: u64,
}

/// How long after a failed build pods boot the kernel without trying again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(600);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The template for `launch` (a [`TemplateRole::Build`] launch) run by the QEMU at `qemu`.
pub fn identity(template_dir: &Path, qemu: &Path, launch: &QemuLaunch) -> Identity {
    // Per-VM paths are not part of the machine: the same placeholders for every pod.
    let mut l = launch.clone();
    l.name = "template".into();
    l.console_socket = "/console".into();
    l.qmp_socket = "/qmp".into();
    l.virtiofs_socket = Some("/fs".into());
    if let VsockDevice::Serial(_) = l.vsock {
        l.vsock = VsockDevice::Serial("/agent".into());
    }
    l.run_as = None;
    l.template = Some(TemplateRole::Build);
    l.ram_file = Some("/ram".into());
    l.ram_private = false;
    l.agent_key = l.agent_key.as_ref().map(|_| "/key".into());
    let inputs: Vec<(PathBuf, String)> = [qemu, &launch.kernel, &launch.initramfs]
        .into_iter()
        .map(|p| (p.to_owned(), fingerprint(p)))
        .collect();
    let mut key = format!("format {FORMAT}\n");
    for (p, f) in &inputs {
        key.push_str(&format!("{} {f}\n", p.display()));
    }
    key.push_str(&qemu_args(&l).join(" "));
    let hash = Sha256::digest(key.as_bytes());
    let name: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Identity {
        dir: template_dir.join(name),
        key,
        inputs,
    }
}

impl Identity {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The guest's RAM, with its zero pages as holes (`template_ram.rs`).
    pub fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join("meta.json")
    }

    /// Why the saved template can't be used, or None if it can.
    pub fn problem(&self) -> Option<String> {
        let text = match std::fs::read_to_string(self.meta_path()) {
            Ok(t) => t,
            Err(e) => return Some(format!("no {} ({e})", self.meta_path().display())),
        };
        let meta: Meta = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => return Some(format!("{} is unreadable: {e}", self.meta_path().display())),
        };
        if meta.key != self.key {
            return Some("it was made from other inputs".into());
        }
        for (what, path, saved) in [
            ("state", self.state(), meta.state_bytes),
            ("RAM", self.ram(), meta.ram_bytes),
        ] {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == saved => {}
                Ok(m) => {
                    return Some(format!(
                        "its {what} is {} bytes, {saved} were saved",
                        m.len()
                    ))
                }
                Err(e) => return Some(format!("no {what} ({e})")),
            }
        }
        None
    }

    /// One line for `containerd-shim-cocoon-v2 check`.
    pub fn describe(&self) -> String {
        match self.problem() {
            None => {
                let state = std::fs::metadata(self.state()).map_or(0, |m| m.len());
                // Zero pages are holes: what a restore copies is what the file occupies.
                let ram = std::fs::metadata(self.ram()).map_or(0, |m| m.blocks() * 512);
                format!(
                    "ready at {} (device state {} KiB, {} MiB of guest RAM with data)",
                    self.dir.display(),
                    state / 1024,
                    ram / (1024 * 1024)
                )
            }
            Some(why) => format!(
                "not made yet at {} ({why}); the first pod makes it",
                self.dir.display()
            ),
        }
    }

    /// Throws the saved template away, so that the next pod makes it again.
    pub(crate) fn discard(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove template {}: {e}", self.dir.display());
            }
        }
    }

    /// Throws the saved template away if its state is still the file `refused` (opened for a
    /// restore that QEMU refused): another pod may have made a new one meanwhile.
    pub(crate) fn discard_refused(&self, refused: &std::fs::File) {
        let same = match (refused.metadata(), std::fs::metadata(self.state())) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            self.discard();
        }
    }
}

/// An exclusive lock on one template, held while it is checked and built.
struct BuildLock(#[allow(dead_code)] std::fs::File);

async fn lock(id: &Identity) -> Result<BuildLock> {
    let path = id.dir.with_extension("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Template(format!("open {}: {e}", path.display())))?;
    let start = Instant::now();
    loop {
        match rustix::fs::flock(
            f.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        ) {
            Ok(()) => return Ok(BuildLock(f)),
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::Template(format!("lock {}: {e}", path.display()))),
        }
        if start.elapsed() > BUILD_WAIT {
            return Err(Error::Template(format!(
                "another pod has been making {} for {BUILD_WAIT:?}",
                id.dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes sure the template exists, building it if not; returns its saved state. The build
/// runs under `dir` (the pod's run directory), so that a shim killed meanwhile leaves a
/// recorded process that `shim delete` reaps.
pub(crate) async fn ensure(
    id: &Identity,
    qemu: &Path,
    launch: &QemuLaunch,
    dir: &RunDir,
    wait_ready: Duration,
    api_limit: Duration,
) -> Result<PathBuf> {
    let parent = id.dir.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| Error::Template(format!("create {}: {e}", parent.display())))?;
    let _lock = lock(id).await?;
    let why = match id.problem() {
        None => return Ok(id.state()),
        Some(why) => why,
    };
    if let Some(f) = std::fs::read_to_string(id.dir.join("failed.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Failed>(&t).ok())
    {
        let ago = unix_now().saturating_sub(f.at_unix);
        if ago < RETRY_AFTER_FAILURE.as_secs() {
            return Err(Error::Template(format!(
                "making {} failed {ago} s ago ({}); it is tried again {RETRY_AFTER_FAILURE:?} after a failure",
                id.dir.display(),
                f.reason
            )));
        }
    }
    log::info!("making VM template {}: {why}", id.dir.display());
    prune_stale(parent, &id.dir);
    id.discard();
    let building = id.dir.with_extension("building");
    let _ = std::fs::remove_dir_all(&building);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&building)
        .map_err(|e| Error::Template(format!("create {}: {e}", building.display())))?;
    let t0 = Instant::now();
    // Whatever goes wrong here is the template's: the pod can still boot the kernel.
    let built = build(&building, qemu, launch, dir, wait_ready, api_limit)
        .await
        .map_err(|e| match e {
            Error::Template(_) => e,
            other => Error::Template(format!("making {}: {other}", id.dir.display())),
        });
    let (state_bytes, ram_bytes) = match built {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            record_failure(id, &e);
            return Err(e);
        }
    };
    let meta = Meta {
        key: id.key.clone(),
        inputs: id.inputs.clone(),
        state_bytes,
        ram_bytes,
        build_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        built_unix: unix_now(),
    };
    let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
    std::fs::write(building.join("meta.json"), text)
        .and_then(|()| std::fs::rename(&building, &id.dir))
        .map_err(|e| Error::Template(format!("keep {}: {e}", id.dir.display())))?;
    log::info!(
        "made VM template {} in {} ms (device state {} KiB)",
        id.dir.display(),
        meta.build_ms,
        state_bytes / 1024
    );
    Ok(id.state())
}

fn record_failure(id: &Identity, e: &Error) {
    let f = Failed {
        inputs: id.inputs.clone(),
        reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
        at_unix: unix_now(),
    };
    let written = std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&id.dir)
        .and_then(|()| {
            std::fs::write(
                id.dir.join("failed.json"),
                serde_json::to_string_pretty(&f).unwrap_or_default(),
            )
        });
    if let Err(e) = written {
        log::warn!("recording the failure in {}: {e}", id.dir.display());
    }
}

/// Removes the templates beside `keep` that nothing can use again: those whose kernel,
/// initramfs or QEMU changed on disk since they were made, and those of another template
/// format (a Cocoon upgrade names new ones).
fn prune_stale(parent: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let this_format = format!("format {FORMAT}\n");
    for e in entries.flatten() {
        let dir = e.path();
        if dir == keep || !dir.is_dir() {
            continue;
        }
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        // Read loosely: another format's meta.json need not have this one's fields.
        let meta =
            read("meta.json").and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let other_format = meta
            .as_ref()
            .and_then(|m| m["key"].as_str())
            .is_some_and(|key| !key.starts_with(&this_format));
        let inputs = meta
            .and_then(|m| {
                serde_json::from_value::<Vec<(PathBuf, String)>>(m["inputs"].clone()).ok()
            })
            .or_else(|| {
                read("failed.json")
                    .and_then(|t| serde_json::from_str::<Failed>(&t).ok())
                    .map(|f| f.inputs)
            });
        let Some(inputs) = inputs else {
            continue;
        };
        if other_format || inputs.iter().any(|(p, f)| fingerprint(p) != *f) {
            log::info!("removing stale VM template {}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(dir.with_extension("lock"));
        }
    }
}

/// Boots the template guest on `<out>/ram`, waits for its agent to say it is ready, and saves
/// its devices into `<out>/state`; returns the sizes of both.
async fn build(
    out: &Path,
    qemu: &Path,
    launch: &QemuLaunch,
    dir: &RunDir,
    wait_ready: Duration,
    api_limit: Duration,
) -> Result<(u64, u64)> {
    let console_log = out.join("console.log");
    let mut l = launch.clone();
    l.template = Some(TemplateRole::Build);
    let ram = out.join("ram");
    let ram_bytes = l.memory_bytes();
    crate::daemon::private_file(&ram)?
        .set_len(ram_bytes)
        .map_err(|e| Error::Template(format!("size {}: {e}", ram.display())))?;
    l.ram_file = Some(ram.clone());
    // Short names: a socket path must fit in sun_path (108 bytes) below a run dir that
    // already holds a 64-character pod id.
    l.console_socket = dir.path("tcons.sock");
    l.qmp_socket = dir.path("tqmp.sock");
    // Nobody connects to the template's channel: its agent waits for the host of each pod.
    if let VsockDevice::Serial(_) = l.vsock {
        l.vsock = VsockDevice::Serial(dir.path("tagent.sock"));
    }
    // The template's key item has the size of a real one and no key in it: each pod restored
    // from it hands its own (`cocoon_protocol::auth::KEY_FW_CFG`); the guest reads it only
    // after the restore, at the host's first connection.
    if l.agent_key.is_some() {
        let placeholder = dir.path("tkey");
        std::fs::write(&placeholder, [0u8; cocoon_protocol::auth::KEY_LEN])
            .map_err(|e| Error::Template(format!("write {}: {e}", placeholder.display())))?;
        l.agent_key = Some(placeholder);
    }
    let _ = std::fs::remove_file(&l.console_socket);
    let relay = ConsoleRelay::start(
        &l.console_socket,
        Output {
            log: console_log.clone(),
            cap: CONSOLE_CAP,
            forward: Forward {
                label: "template".into(),
                level: log::LevelFilter::Warn,
            },
        },
    )?;
    let mut q = Command::new(qemu);
    q.args(qemu_args(&l));
    let mut vm = dir.spawn("qemu-template", q, None)?;
    let saved = save(&mut vm, &l, out, &console_log, wait_ready, api_limit).await;
    if saved.is_err() {
        vm.kill();
    }
    if let Err(e) = vm.stop(STOP_GRACE).await {
        log::debug!("template QEMU: {e}");
    }
    relay.finish(STOP_GRACE).await;
    for f in [&l.console_socket, &l.qmp_socket] {
        let _ = std::fs::remove_file(f);
    }
    if let Some(k) = &l.agent_key {
        let _ = std::fs::remove_file(k);
    }
    let _ = std::fs::remove_file(dir.path("qemu-template.log"));
    let state_bytes = saved?;
    // QEMU has exited: nothing writes the RAM any more.
    let punched = ram.clone();
    let data = tokio::task::spawn_blocking(move || super::template_ram::punch_zero_pages(&punched))
        .await
        .map_err(|e| Error::Template(format!("punching zero pages: {e}")))??;
    // Clones map it (`restore.rs`); from here on nothing may write it, root included by
    // mistake: read-only for its owner, nothing for anyone else.
    std::fs::set_permissions(&ram, std::os::unix::fs::PermissionsExt::from_mode(0o400))
        .map_err(|e| Error::Template(format!("make {} read-only: {e}", ram.display())))?;
    log::info!(
        "VM template RAM: {} of {} MiB hold data; the zero pages are holes",
        data >> 20,
        ram_bytes >> 20
    );
    Ok((state_bytes, ram_bytes))
}

async fn save(
    vm: &mut Daemon,
    l: &QemuLaunch,
    out: &Path,
    console_log: &Path,
    wait_ready: Duration,
    api_limit: Duration,
) -> Result<u64> {
    let mut qmp = super::wait_for_qmp(vm, &l.qmp_socket, api_limit, |vm, status| {
        Error::DaemonExited {
            name: vm.name,
            status: status.to_string(),
            log_tail: vm.log_tail(10),
        }
    })
    .await?;
    // The agent prints the marker once it waits for its devices (agent/src/init.rs).
    let start = Instant::now();
    loop {
        let console = std::fs::read_to_string(console_log).unwrap_or_default();
        if console.contains(cocoon_protocol::TEMPLATE_READY) {
            break;
        }
        if let Some(status) = vm.try_exited() {
            return Err(Error::Template(format!(
                "the template guest exited ({status}) before its agent was ready; console:\n{}",
                tail_lines(console_log, 20)
            )));
        }
        if start.elapsed() > wait_ready {
            return Err(Error::Template(format!(
                "the template guest's agent was not ready within {wait_ready:?}; console:\n{}",
                tail_lines(console_log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    qmp.execute("stop", None).await?;
    set_ignore_shared(&mut qmp).await?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": UNCAPPED_BYTES_PER_S})),
    )
    .await?;
    let path = out.join("state");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Template(format!("create {}: {e}", path.display())))?;
    qmp.getfd("state", file.as_fd()).await?;
    qmp.execute("migrate", Some(json!({"uri": "fd:state"})))
        .await?;
    let start = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info.get("status").and_then(|s| s.as_str()).unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(Error::Template(format!(
                    "saving the template failed: {}",
                    info.get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or("no reason given")
                )))
            }
            _ => {}
        }
        if start.elapsed() > SAVE_LIMIT {
            return Err(Error::Template(format!(
                "saving the template took longer than {SAVE_LIMIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    file.sync_all()
        .map_err(|e| Error::Template(format!("sync {}: {e}", path.display())))?;
    let _ = qmp.quit().await;
    std::fs::metadata(&path)
        .map(|m| m.len())
        .map_err(|e| Error::Template(format!("stat {}: {e}", path.display())))
}

/// Leaves shared RAM (a template's, a restored pod's) out of the migration stream.
pub(crate) async fn set_ignore_shared<S>(qmp: &mut super::qmp::Qmp<S>) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod tests;
