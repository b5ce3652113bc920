//! The pod model: one pod's VM, its containers and their processes, and the rules that tie them
//! together. The Task RPC layer (`task.rs`) only converts to and from this.
//!
//! Lifecycle: the first container's create boots the VM ([`VmFactory`]); deleting the last
//! container (or Shutdown with none left) stops it.
//!
//! Locking, all of it here:
//! - `state` (the pod's bookkeeping) is taken only through [`Pod::with_state`], whose closure
//!   can't await: the lock is never held while a VM boots, the agent works or an event goes out,
//!   so State and friends answer at once whatever else is in flight.
//! - `lifecycle` serializes the calls that may boot or stop the VM (create, the delete of a
//!   container's init, Shutdown): a create never races a VM that is going away.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::agent as ag;
use cocoon_protocol::protobuf::MessageField;
use cocoon_protocol::ProcessRef;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::events::{Event, EventSink};
pub use crate::guest::{GuestLink, StdioDialer};
use crate::phase::{Phase, PhaseLine};
use crate::process::{wire_stdio, Container, Exit, Process, StdioPaths};
use crate::rootfs::{Mounter, RootfsSource};
use crate::state::SandboxState;
use crate::{Error, Result};

/// How long a broken agent call waits for the VM's death to show (see
/// [`Pod::vm_gone_after_a_broken_call`]).
pub(crate) const VM_EXIT_GRACE: Duration = Duration::from_secs(1);

/// Asks `probe` how the VM died until it says, for up to [`VM_EXIT_GRACE`]: a VMM or helper
/// killed a moment ago breaks the agent's connection before its exit can be reaped.
pub(crate) async fn within_exit_grace<T, F>(mut probe: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let t0 = tokio::time::Instant::now();
    loop {
        if let Some(why) = probe().await {
            return Some(why);
        }
        if t0.elapsed() >= VM_EXIT_GRACE {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod attack_tests;
mod copies;
#[cfg(test)]
mod copies_tests;
mod debug;
pub use debug::{DebugControl, DebugSession};
mod facts;
#[cfg(test)]
mod fake;
pub use facts::{PodFacts, VmView};
mod hooks;
mod layer_rootfs;
pub use layer_rootfs::{layers_of, LayerPolicy};
#[cfg(test)]
mod layer_tests;
mod mounts;
mod ops;
mod seams;
mod stats;
pub use seams::{BootTimes, PodVm, VmFactory, VmFacts};
pub use stats::{GuestUsage, HostUsage, PodStats};
#[cfg(test)]
mod tests;
mod watchers;

/// A container to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: String,
    pub bundle: String,
    /// `config.json` as containerd wrote it, passed to the guest unchanged.
    pub spec_json: Vec<u8>,
    pub spec: serde_json::Value,
    pub rootfs: RootfsSource,
    pub stdio: StdioPaths,
}

/// What State reports about a process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessState {
    pub bundle: String,
    pub pid: u32,
    pub status: crate::process::Status,
    pub stdio: StdioPaths,
    pub exit: Option<Exit>,
}

/// A VM taken out of the pod to be stopped, with its OOM watcher.
type TakenVm = (Box<dyn PodVm>, Option<JoinHandle<()>>);

#[derive(Debug, Default)]
struct PodState {
    vm: Option<Box<dyn PodVm>>,
    containers: HashMap<String, Container>,
    /// Mirrors `state.json`: what a crash would leave on the host.
    footprint: SandboxState,
    oom_watch: Option<JoinHandle<()>>,
    /// The volume binds the pod's containers hold (`mounts.rs`).
    volumes: crate::volumes::Slots,
    /// The layer disks plugged into the VM (`layer_rootfs.rs`).
    disks: layer_rootfs::Disks,
    /// The small host files copied into the guest (`copies.rs`).
    copies: copies::Copies,
    /// OOM kills the guest reported in the pod's containers (`watchers.rs`), for the monitor.
    oom_events: u64,
}

impl PodState {
    fn guest(&self) -> Result<GuestLink> {
        self.vm
            .as_ref()
            .map(|vm| vm.guest())
            .ok_or(Error::NotRunning)
    }

    fn container(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn process(&self, p: &ProcessRef) -> Result<&Process> {
        self.container(&p.container_id)?
            .process(p.exec_id.as_deref())
    }

    fn process_mut(&mut self, p: &ProcessRef) -> Result<&mut Process> {
        self.container_mut(&p.container_id)?
            .process_mut(p.exec_id.as_deref())
    }

    /// Writes `state.json`, atomically; a failure only costs crash cleanup, so it is logged.
    fn save_footprint(&self) {
        if let Some(vm) = &self.vm {
            if let Err(e) = self.footprint.save(&vm.run_dir()) {
                log::warn!("saving state.json: {e}");
            }
        }
    }

    /// Takes the VM (and its OOM watcher) out once no container is left.
    fn take_vm_if_empty(&mut self) -> Option<TakenVm> {
        if !self.containers.is_empty() {
            return None;
        }
        let vm = self.vm.take()?;
        self.copies.clear();
        Some((vm, self.oom_watch.take()))
    }
}

/// Records the VM's host processes in the crash record, with their start times: at boot, and
/// again when the VM started one later (a virtiofsd plugged in on demand).
fn record_processes(footprint: &mut SandboxState, vm: &dyn PodVm) {
    footprint.pids = vm.host_pids();
    footprint.starts = footprint
        .pids
        .iter()
        .filter_map(|(_, p)| Some((*p, crate::state::start_time(*p)?)))
        .collect();
}

struct Inner {
    id: String,
    factory: Box<dyn VmFactory>,
    mounter: Box<dyn Mounter>,
    events: Box<dyn EventSink>,
    state: Mutex<PodState>,
    lifecycle: Mutex<()>,
    /// [`PodVm::reported_pid`] of the VM booted last (0: none); kept after it stopped, for
    /// the Delete and exit events that follow.
    reported_pid: std::sync::atomic::AtomicU32,
}

/// One pod: cloneable, every clone is the same pod.
#[derive(Clone)]
pub struct Pod {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Pod {
    pub fn new(
        id: String,
        factory: Box<dyn VmFactory>,
        mounter: Box<dyn Mounter>,
        events: Box<dyn EventSink>,
    ) -> Pod {
        Pod {
            inner: Arc::new(Inner {
                id,
                factory,
                mounter,
                events,
                state: Mutex::default(),
                lifecycle: Mutex::default(),
                reported_pid: std::sync::atomic::AtomicU32::new(0),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The one place the pod lock is taken (see the module doc).
    async fn with_state<R>(&self, f: impl FnOnce(&mut PodState) -> R) -> R {
        let mut state = self.inner.state.lock().await;
        f(&mut state)
    }

    async fn guest(&self) -> Result<GuestLink> {
        self.with_state(|s| s.guest()).await
    }

    /// Kills the pod's VM (see [`PodVm::kill`]); the VM stays recorded, so that the deletes
    /// that follow clean up as after a crash.
    async fn kill_vm(&self) {
        self.with_state(|s| {
            if let Some(vm) = s.vm.as_mut() {
                vm.kill();
            }
        })
        .await;
    }

    /// Why the pod's VM is gone, if its VMM exited.
    async fn vm_gone(&self) -> Option<String> {
        self.with_state(|s| s.vm.as_mut().and_then(|vm| vm.exit_reason()))
            .await
    }

    /// [`Self::vm_gone`], for a caller whose agent connection just broke: a killed VMM drops
    /// its sockets (and so the agent's connection) while it is still exiting, a moment before
    /// it can be reaped, so the VM's death is given up to [`VM_EXIT_GRACE`] to show.
    async fn vm_gone_after_a_broken_call(&self) -> Option<String> {
        within_exit_grace(|| self.vm_gone()).await
    }

    async fn publish(&self, event: Event) {
        let event = match self
            .inner
            .reported_pid
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => event,
            pid => event.with_pid(pid),
        };
        self.inner.events.publish(event).await;
    }

    /// The pid to tell containerd for a process whose guest pid is `pid` (0, a process not
    /// started yet, stays 0).
    pub fn reported_pid(&self, pid: u32) -> u32 {
        match self
            .inner
            .reported_pid
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            host if host != 0 && pid != 0 => host,
            _ => pid,
        }
    }

    /// Boots the VM for the container in `req` and records it; the caller holds `lifecycle`.
    async fn boot(&self, req: &CreateRequest, share: bool) -> Result<(GuestLink, PathBuf)> {
        let vm = self
            .inner
            .factory
            .boot(&self.inner.id, &req.spec, share)
            .await?;
        if let Some(pid) = vm.reported_pid() {
            self.inner
                .reported_pid
                .store(pid, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(t) = vm.boot_times() {
            let booted = Phase::Booted {
                vmm_started: t.vmm_started,
                agent_ready: t.agent_ready,
            };
            PhaseLine::new(booted, ProcessRef::init(&req.id)).emit();
        }
        let guest = vm.guest();
        let rootfs_dir = vm.rootfs_dir();
        let mut footprint = SandboxState {
            sandbox_id: self.inner.id.clone(),
            starts: vec![],
            pids: vec![],
            mounts: vec![],
            cgroup: vm.cgroup(),
            shim: Some(std::process::id()),
        };
        record_processes(&mut footprint, vm.as_ref());
        let oom_watch = self.watch_oom(guest.agent.clone());
        self.with_state(|s| {
            s.vm = Some(vm);
            s.footprint = footprint;
            s.oom_watch = Some(oom_watch);
            s.save_footprint();
        })
        .await;
        Ok((guest, rootfs_dir))
    }

    /// Stops a VM taken out of the pod: its OOM watcher, its crash record, then the VM.
    async fn stop_vm(&self, taken: Option<TakenVm>) {
        let Some((vm, oom_watch)) = taken else {
            return;
        };
        if let Some(h) = oom_watch {
            h.abort();
        }
        let _ = std::fs::remove_file(vm.run_dir().join(crate::state::FILE));
        if let Err(e) = vm.shutdown().await {
            log::warn!("stopping the pod VM: {e}");
        }
    }

    /// Creates a container; the first one boots the VM. On failure nothing of it is left, and
    /// a VM booted for it alone is stopped again.
    pub async fn create(&self, req: CreateRequest) -> Result<u32> {
        let init = ProcessRef::init(&req.id);
        PhaseLine::new(Phase::CreateBegin, init.clone()).emit();
        // Volumes are checked before anything boots: a bad source fails the create at once.
        let mut plan = crate::volumes::plan(&req.spec, &req.id, crate::volumes::HostPath::of)?;
        let lifecycle = self.inner.lifecycle.lock().await;
        let running = self
            .with_state(|s| {
                if s.containers.contains_key(&req.id) {
                    return Err(Error::AlreadyExists(format!("container {}", req.id)));
                }
                Ok(s.vm.as_ref().map(|vm| (vm.guest(), vm.rootfs_dir())))
            })
            .await?;
        let (guest, rootfs_dir) = match running {
            Some(r) => r,
            None => self.boot(&req, self.share_at_boot(&req, &plan)).await?,
        };
        let rootfs = rootfs_dir.join(&req.id).join("rootfs");
        let mut volumes: Vec<PathBuf> = vec![];
        let mut copies: Vec<String> = vec![];
        let mut layers: Option<layer_rootfs::Assembled> = None;
        let kept_hooks = hooks::kept(&req.spec);
        let created = async {
            layers = self.plug_layers(&req.id, &req.spec, &req.rootfs).await?;
            if layers.is_none() {
                let staging = rootfs_dir
                    .with_file_name(vmm_driver::share::STAGING_DIR)
                    .join(&req.id);
                self.inner
                    .mounter
                    .mount(&req.rootfs, &staging, &rootfs)
                    .await?;
            }
            copies = self.put_copies(&guest, &mut plan, &req.id).await?;
            let uses_share = layers.is_none() || !plan.binds.is_empty();
            if uses_share {
                self.ensure_share(&req.id).await?;
            }
            volumes = self.bind_volumes(&mut plan, &rootfs_dir).await?;
            let relays = wire_stdio(&guest, &init, &req.stdio).await?;
            let creq = ag::CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec_json: if plan.spec == req.spec {
                    req.spec_json.clone()
                } else {
                    plan.spec.to_string().into_bytes()
                },
                rootfs: match &layers {
                    Some(_) => String::new(),
                    None => format!("{}/rootfs", req.id),
                },
                layer_rootfs: layers.as_ref().map(|l| l.request.clone()).into(),
                uses_share,
                stdio: MessageField::some(req.stdio.streams()),
                submounts: plan.submounts.clone(),
                ephemeral_volumes: plan
                    .ephemeral
                    .iter()
                    .map(|e| ag::EphemeralVolume {
                        path: e.path.clone(),
                        size_bytes: e.size,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            let started = async {
                let pid = guest
                    .call("create", guest.agent.create_container(guest.ctx(), &creq))
                    .await?
                    .pid;
                self.created_hooks(&guest, &kept_hooks, &req.id, &req.bundle, pid)
                    .await?;
                Ok::<_, Error>(pid)
            }
            .await;
            relays.kept_if(started)
        }
        .await;
        let (pid, relays) = match created {
            Ok(v) => {
                if let Some(adj) = crate::placement::oom_score_adj(&req.spec) {
                    self.with_state(|s| s.vm.as_ref().map(|vm| vm.raise_oom_score(adj)))
                        .await;
                }
                v
            }
            Err(e) => {
                self.release_copies(Some(&guest), &copies).await;
                self.release_volumes(&volumes).await;
                match &layers {
                    Some(l) => self.release_layers(&l.disks).await,
                    None => mounts::unmount_rootfs(self.inner.mounter.as_ref(), &rootfs),
                }
                let taken = self.with_state(PodState::take_vm_if_empty).await;
                self.stop_vm(taken).await;
                return Err(e);
            }
        };
        let mut process = Process::new(req.stdio.clone(), vec![]);
        if let Some(tx) = process.attach(pid, relays.stdin) {
            self.watch_exit(guest.agent.clone(), init.clone(), pid, relays.outputs, tx);
        }
        self.with_state(|s| {
            s.containers.insert(
                req.id.clone(),
                Container {
                    bundle: req.bundle.clone(),
                    rootfs: layers.is_none().then_some(rootfs),
                    layers: layers.map(|l| l.disks).unwrap_or_default(),
                    volumes,
                    copies,
                    hooks: kept_hooks,
                    init: process,
                    execs: HashMap::new(),
                },
            );
            s.record_mounts();
        })
        .await;
        drop(lifecycle);
        PhaseLine::new(Phase::Created, init).emit();
        self.publish(Event::Create {
            container_id: req.id,
            bundle: req.bundle,
            rootfs: req.rootfs.mounts,
            stdio: req.stdio,
            pid,
        })
        .await;
        Ok(pid)
    }

    /// Deletes a process: an exec is forgotten; a container is removed from the guest and the
    /// host, and the last one stops the VM.
    pub async fn delete(&self, p: &ProcessRef) -> Result<(u32, Exit)> {
        if let Some(eid) = &p.exec_id {
            return self
                .with_state(|s| {
                    let gone = s
                        .container_mut(&p.container_id)?
                        .execs
                        .remove(eid)
                        .ok_or_else(|| Error::NotFound(format!("exec {eid}")))?;
                    Ok((gone.pid, gone.exit().unwrap_or(Exit::now(0))))
                })
                .await;
        }
        let cid = &p.container_id;
        let _lifecycle = self.inner.lifecycle.lock().await;
        let guest = self
            .with_state(|s| s.container(cid).and_then(|_| s.guest()))
            .await?;
        let rreq = ag::RemoveContainerRequest {
            container_id: cid.clone(),
            ..Default::default()
        };
        let removed = guest
            .call("remove", guest.agent.remove_container(guest.ctx(), &rreq))
            .await;
        if let Err(e) = removed {
            log::warn!("removing {cid} in the guest: {e}");
        }
        let (c, gone, taken) = self
            .with_state(|s| {
                let c = s
                    .containers
                    .remove(cid)
                    .ok_or_else(|| Error::NotFound(format!("container {cid}")))?;
                let gone = s.volumes.release(&c.volumes);
                let copies_gone = s.copies.release(&c.copies);
                s.record_mounts();
                let taken = s.take_vm_if_empty();
                Ok::<_, Error>((c, (gone, copies_gone), taken))
            })
            .await?;
        let (gone, copies_gone) = gone;
        if taken.is_none() {
            copies::remove_in_guest(&guest, &copies_gone).await;
        }
        mounts::unmount_volumes(self.inner.mounter.as_ref(), &gone);
        if let Some(rootfs) = &c.rootfs {
            mounts::unmount_rootfs(self.inner.mounter.as_ref(), rootfs);
        }
        match taken {
            // The VM goes, and its disks with it.
            Some(_) => self.stop_vm(taken).await,
            None => self.release_layers(&c.layers).await,
        }
        self.later_hooks(
            &c.hooks,
            crate::hooks::Stage::Stopped,
            cid,
            &c.bundle,
            c.init.pid,
        )
        .await;
        let exit = c.init.exit().unwrap_or(Exit::now(137));
        PhaseLine::new(Phase::Deleted, p.clone()).emit();
        self.publish(Event::Delete {
            container_id: cid.clone(),
            pid: c.init.pid,
            exit,
        })
        .await;
        Ok((c.init.pid, exit))
    }

    /// containerd's Shutdown: with no container left, stops the VM (if any) and says the shim
    /// may exit; otherwise does nothing and says it may not.
    pub async fn shutdown(&self) -> bool {
        let _lifecycle = self.inner.lifecycle.lock().await;
        let (empty, taken) = self
            .with_state(|s| (s.containers.is_empty(), s.take_vm_if_empty()))
            .await;
        self.stop_vm(taken).await;
        empty
    }
}
