//! Test doubles for the pod model: a fake agent (the generated `AgentService` served over a
//! socketpair, so the real ttrpc client and codec are exercised), a fake VM around it, a
//! recording mounter and a recording event sink. Every double writes to one shared journal so
//! tests can assert the order of what happened across them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use cocoon_protocol::agent as ag;
use cocoon_protocol::agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
use cocoon_protocol::StdioHello;
use tokio::sync::{mpsc, watch, Mutex};
use ttrpc::r#async::transport::{Listener, Socket};
use ttrpc::r#async::{Client, Server, TtrpcContext};
use vmm_driver::vsock::BoxedStream;

use super::{BootTimes, GuestLink, PodVm, StdioDialer, VmFactory};
use crate::events::{Event, EventSink};
use crate::rootfs::{Mounter, RootfsSource};
use crate::{Error, Result};

/// What happened, in order, across the agent, the VM, the mounter.
#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<StdMutex<Vec<String>>>);

impl Journal {
    pub fn add(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }

    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// The exit code of one fake process, once it has one.
type ExitCode = watch::Sender<Option<i32>>;

/// The guest side: processes exit when signalled; OOM events are fed by the test.
pub struct FakeAgent {
    journal: Journal,
    next_pid: AtomicU32,
    exits: StdMutex<HashMap<(String, String), ExitCode>>,
    oom: Mutex<mpsc::UnboundedReceiver<String>>,
    /// Runs inside CreateContainer, while the host waits: what a hostile guest does then.
    pub on_create: StdMutex<Option<GuestAction>>,
    /// A frozen guest: calls that reach the agent are never answered.
    pub frozen: AtomicBool,
}

/// Something the fake guest does during a call, given the container id.
pub type GuestAction = Box<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for FakeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAgent").finish_non_exhaustive()
    }
}

impl FakeAgent {
    fn exit_of(&self, cid: &str, eid: &str) -> watch::Sender<Option<i32>> {
        self.exits
            .lock()
            .unwrap()
            .entry((cid.to_owned(), eid.to_owned()))
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    fn pid(&self) -> u32 {
        self.next_pid.fetch_add(1, Ordering::SeqCst)
    }

    /// Never returns while the guest is frozen, as a stopped VM never answers.
    async fn answer_unless_frozen(&self) {
        if self.frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

fn refuse(code: ttrpc::Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

#[async_trait]
impl AgentService for FakeAgent {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        r: ag::CreateContainerRequest,
    ) -> ttrpc::Result<ag::CreateContainerResponse> {
        match r.layer_rootfs.as_ref() {
            Some(l) => self.journal.add(format!(
                "agent create {} layers {:?} scratch {}",
                r.container_id,
                l.layers.iter().map(|d| d.lun).collect::<Vec<_>>(),
                l.scratch_lun
            )),
            None => self.journal.add(format!("agent create {}", r.container_id)),
        }
        if let Some(act) = &*self.on_create.lock().unwrap() {
            act(&r.container_id);
        }
        if r.container_id.starts_with("bad") {
            return Err(refuse(ttrpc::Code::INVALID_ARGUMENT, "no such executable"));
        }
        Ok(ag::CreateContainerResponse {
            pid: self.pid(),
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        r: ag::StartContainerRequest,
    ) -> ttrpc::Result<ag::StartContainerResponse> {
        self.journal.add(format!("agent start {}", r.container_id));
        Ok(ag::StartContainerResponse {
            pid: 100,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        r: ag::ExecProcessRequest,
    ) -> ttrpc::Result<ag::ExecProcessResponse> {
        self.answer_unless_frozen().await;
        let json = String::from_utf8_lossy(&r.process_json).into_owned();
        self.journal.add(format!(
            "agent exec {}/{} {json}",
            r.container_id, r.exec_id
        ));
        if r.exec_id.starts_with("bad") {
            return Err(refuse(ttrpc::Code::INVALID_ARGUMENT, "no such executable"));
        }
        Ok(ag::ExecProcessResponse {
            pid: self.pid(),
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        r: ag::SignalProcessRequest,
    ) -> ttrpc::Result<ag::Empty> {
        self.answer_unless_frozen().await;
        let eid = if r.exec_id.is_empty() {
            "-"
        } else {
            &r.exec_id
        };
        self.journal.add(format!(
            "agent signal {}/{eid} {}",
            r.container_id, r.signal
        ));
        let code = 128 + i32::try_from(r.signal).unwrap_or(0);
        self.exit_of(&r.container_id, &r.exec_id)
            .send_replace(Some(code));
        Ok(ag::Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        r: ag::WaitProcessRequest,
    ) -> ttrpc::Result<ag::WaitProcessResponse> {
        let mut rx = self.exit_of(&r.container_id, &r.exec_id).subscribe();
        let code = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| refuse(ttrpc::Code::INTERNAL, "gone"))?
            .unwrap_or(0);
        Ok(ag::WaitProcessResponse {
            status: code,
            exited_at_unix_nanos: 5_000_000_000,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        r: ag::RemoveContainerRequest,
    ) -> ttrpc::Result<ag::Empty> {
        self.answer_unless_frozen().await;
        self.journal.add(format!("agent remove {}", r.container_id));
        Ok(ag::Empty::new())
    }

    async fn put_files(
        &self,
        _: &TtrpcContext,
        r: ag::PutFilesRequest,
    ) -> ttrpc::Result<ag::Empty> {
        let what = match r.remove {
            true => "remove".to_owned(),
            false => format!("{} entries", r.entries.len()),
        };
        self.journal.add(format!("agent put {} {what}", r.name));
        Ok(ag::Empty::new())
    }

    async fn read_file(
        &self,
        _: &TtrpcContext,
        r: ag::ReadFileRequest,
    ) -> ttrpc::Result<ag::ReadFileResponse> {
        self.journal.add(format!("agent read {}", r.name));
        Ok(ag::ReadFileResponse {
            data: b"written in the guest\n".to_vec(),
            ..Default::default()
        })
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: ag::GetOOMEventRequest,
    ) -> ttrpc::Result<ag::OOMEvent> {
        match self.oom.lock().await.recv().await {
            Some(container_id) => Ok(ag::OOMEvent {
                container_id,
                ..Default::default()
            }),
            None => Err(refuse(ttrpc::Code::UNAVAILABLE, "no more events")),
        }
    }
}

/// Serves `agent` on one end of a socketpair and returns a client on the other. The bytes go
/// through a relay task: aborting it cuts the connection the way a dying VM does.
async fn connect(agent: Arc<FakeAgent>) -> (AgentServiceClient, tokio::task::JoinHandle<()>) {
    let (client_end, mut near) = tokio::net::UnixStream::pair().unwrap();
    let (mut far, server_end) = tokio::net::UnixStream::pair().unwrap();
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut near, &mut far).await;
    });
    let listener = Listener::new(
        futures::stream::iter([Ok::<_, std::io::Error>(server_end)])
            .chain(futures::stream::pending()),
    );
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(create_agent_service(agent));
    tokio::spawn(async move {
        let _ = server.start().await;
        // Keep the server (and its connection) alive for the test's lifetime.
        std::future::pending::<()>().await;
    });
    let client = AgentServiceClient::new(Client::new(Socket::new(client_end)));
    (client, relay)
}

use futures::StreamExt as _;

/// No stdio in these tests: a process with FIFOs would need a guest to write them.
#[derive(Debug)]
struct NoStdio;

#[async_trait]
impl StdioDialer for NoStdio {
    async fn open(&self, hello: &StdioHello) -> Result<BoxedStream> {
        Err(Error::io(
            format!("stdio {}", hello.to_line().trim_end()),
            std::io::Error::other("the fake VM has no stdio"),
        ))
    }
}

/// `agent.call_timeout_ms` of the fake VM: long enough for a loaded machine, short for a test
/// that waits it out.
pub const FAKE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A VM that is only its agent connection.
pub struct FakeVm {
    agent: AgentServiceClient,
    relay: tokio::task::JoinHandle<()>,
    dir: PathBuf,
    journal: Journal,
    real_share: bool,
    disks: Option<Arc<dyn vmm_driver::DiskHotplug>>,
}

impl std::fmt::Debug for FakeVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeVm")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl PodVm for FakeVm {
    fn facts(&self) -> super::VmFacts {
        super::VmFacts {
            hypervisor: vmm_driver::config::Hypervisor::Qemu,
            vcpus: 1,
            memory_mib: 256,
            from_template: false,
            ram_cloned: false,
            started_unix_ms: 0,
            console_log: self.dir.join("console.log"),
            template_console_log: None,
        }
    }

    fn guest(&self) -> GuestLink {
        GuestLink {
            agent: self.agent.clone(),
            stdio: Arc::new(NoStdio),
            network: None,
            bounds: crate::guest::Bounds {
                pod: "pod1".into(),
                call: FAKE_CALL_TIMEOUT,
                stdio: FAKE_CALL_TIMEOUT,
                calls: Arc::default(),
            },
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    fn rootfs_dir(&self) -> PathBuf {
        vmm_driver::share::host_dir(&self.dir)
    }

    fn host_pids(&self) -> Vec<(String, u32)> {
        vec![("fake-vmm".into(), u32::MAX - 1)]
    }

    fn share_pid(&self) -> Option<u32> {
        Some(u32::MAX - 2)
    }

    fn boot_times(&self) -> Option<BootTimes> {
        None
    }

    fn disk_hotplug(&self) -> Option<Arc<dyn vmm_driver::DiskHotplug>> {
        self.disks.clone()
    }

    fn exit_reason(&mut self) -> Option<String> {
        self.relay
            .is_finished()
            .then(|| "the fake VMM was killed".to_owned())
    }

    fn raise_oom_score(&self, adj: i32) {
        self.journal.add(format!("oom score {adj}"));
    }

    fn kill(&mut self) {
        self.journal.add("vm killed");
        self.relay.abort();
    }

    async fn shutdown(self: Box<Self>) -> Result<()> {
        self.journal.add("vm shutdown");
        self.relay.abort();
        if self.real_share {
            vmm_driver::share::unexport(&self.dir);
        }
        Ok(())
    }
}

/// Boots [`FakeVm`]s on one [`FakeAgent`], and can cut their connection.
#[derive(Debug)]
pub struct FakeFactory {
    agent: Arc<FakeAgent>,
    journal: Journal,
    dir: PathBuf,
    relay: StdMutex<Option<tokio::task::AbortHandle>>,
    fail: AtomicBool,
    /// Export the run dir like the real driver (`vmm_driver::share`), for tests with real mounts.
    real_share: bool,
    /// Layer disks for the pod's rootfs (`layer_tests.rs`): the policy, and the VMs' disks.
    pub layers: StdMutex<Option<(super::LayerPolicy, Arc<dyn vmm_driver::DiskHotplug>)>>,
}

#[async_trait]
impl VmFactory for Arc<FakeFactory> {
    async fn boot(
        &self,
        sandbox_id: &str,
        _spec: &serde_json::Value,
        share: bool,
    ) -> Result<Box<dyn PodVm>> {
        self.journal.add(match share {
            true => format!("vm boot {sandbox_id}"),
            false => format!("vm boot {sandbox_id} without share"),
        });
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Boot(Box::new(Error::NotRunning)));
        }
        if self.real_share {
            vmm_driver::share::export(&self.dir)?;
        }
        let (agent, relay) = connect(self.agent.clone()).await;
        *self.relay.lock().unwrap() = Some(relay.abort_handle());
        Ok(Box::new(FakeVm {
            agent,
            relay,
            dir: self.dir.clone(),
            journal: self.journal.clone(),
            real_share: self.real_share,
            disks: self.layers.lock().unwrap().as_ref().map(|l| l.1.clone()),
        }))
    }

    fn layer_policy(&self) -> Option<super::LayerPolicy> {
        self.layers.lock().unwrap().as_ref().map(|l| l.0.clone())
    }
}

impl FakeFactory {
    /// Cuts the agent connection of the VM booted last, as if the VM died.
    pub fn kill_vm(&self) {
        if let Some(r) = self.relay.lock().unwrap().take() {
            r.abort();
        }
    }

    pub fn fail_boots(&self) {
        self.fail.store(true, Ordering::SeqCst);
    }
}

/// Records mounts; `fail` makes every mount fail.
#[derive(Debug, Default)]
pub struct FakeMounter {
    journal: Journal,
    pub fail: AtomicBool,
}

#[async_trait]
impl Mounter for Arc<FakeMounter> {
    async fn mount(&self, _source: &RootfsSource, _staging: &Path, target: &Path) -> Result<()> {
        self.journal.add(format!("mount {}", short(target)));
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::io("mount", std::io::Error::other("refused")));
        }
        std::fs::create_dir_all(target).map_err(|e| Error::io("mkdir", e))
    }

    fn bind_volume(
        &self,
        _bind: &crate::volumes::Bind,
        _staging: &Path,
        target: &Path,
        _at: &crate::volumes::Placement,
    ) -> Result<()> {
        self.journal.add(format!("bind {}", short(target)));
        std::fs::create_dir_all(target).map_err(|e| Error::io("mkdir", e))
    }

    fn unbind_volume(&self, target: &Path) {
        self.journal.add(format!("unmount {}", short(target)));
        crate::volumes::remove_target(target);
    }

    fn unmount(&self, target: &Path) {
        self.journal.add(format!("unmount {}", short(target)));
    }
}

/// `<cid>/rootfs`, the part of a rootfs path that matters to a test.
fn short(p: &Path) -> String {
    let n: Vec<_> = p.iter().rev().take(2).collect();
    format!("{}/{}", n[1].to_string_lossy(), n[0].to_string_lossy())
}

/// Keeps every event.
#[derive(Debug, Default)]
pub struct FakeSink(pub StdMutex<Vec<Event>>);

#[async_trait]
impl EventSink for Arc<FakeSink> {
    async fn publish(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

/// Everything a test needs: the pod and handles on its doubles.
#[derive(Debug)]
pub struct Rig {
    pub pod: super::Pod,
    pub journal: Journal,
    pub factory: Arc<FakeFactory>,
    pub mounter: Arc<FakeMounter>,
    pub events: Arc<FakeSink>,
    pub oom: mpsc::UnboundedSender<String>,
    pub dir: tempfile::TempDir,
}

impl Rig {
    pub fn new() -> Rig {
        Rig::build(false)
    }

    /// A rig whose rootfs mounts are real ([`crate::rootfs::HostMounter`]) in a really
    /// exported run dir: for tests that need root.
    pub fn with_real_mounts() -> Rig {
        Rig::build(true)
    }

    fn build(real: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::default();
        let (oom, oom_rx) = mpsc::unbounded_channel();
        let agent = Arc::new(FakeAgent {
            journal: journal.clone(),
            next_pid: AtomicU32::new(10),
            exits: StdMutex::default(),
            oom: Mutex::new(oom_rx),
            on_create: StdMutex::default(),
            frozen: AtomicBool::new(false),
        });
        let factory = Arc::new(FakeFactory {
            agent,
            journal: journal.clone(),
            dir: dir.path().to_owned(),
            relay: StdMutex::default(),
            fail: AtomicBool::new(false),
            real_share: real,
            layers: StdMutex::default(),
        });
        let mounter = Arc::new(FakeMounter {
            journal: journal.clone(),
            fail: AtomicBool::new(false),
        });
        let events = Arc::new(FakeSink::default());
        let pod_mounter: Box<dyn Mounter> = if real {
            Box::new(crate::rootfs::HostMounter)
        } else {
            Box::new(mounter.clone())
        };
        let pod = super::Pod::new(
            "pod1".into(),
            Box::new(factory.clone()),
            pod_mounter,
            Box::new(events.clone()),
        );
        Rig {
            pod,
            journal,
            factory,
            mounter,
            events,
            oom,
            dir,
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.0.lock().unwrap().clone()
    }

    /// A create request without stdio, for a container with this id.
    /// Runs `act` in the fake guest during every CreateContainer.
    pub fn on_create(&self, act: GuestAction) {
        *self.factory.agent.on_create.lock().unwrap() = Some(act);
    }

    /// Freezes the fake guest: from now on the agent answers nothing that can hang.
    pub fn freeze(&self) {
        self.factory.agent.frozen.store(true, Ordering::SeqCst);
    }

    pub fn create_request(&self, id: &str) -> super::CreateRequest {
        super::CreateRequest {
            id: id.into(),
            bundle: format!("/bundles/{id}"),
            spec_json: b"{}".to_vec(),
            spec: serde_json::json!({}),
            rootfs: RootfsSource {
                mounts: vec![],
                bundle_rootfs: PathBuf::from(format!("/bundles/{id}/rootfs")),
            },
            stdio: crate::process::StdioPaths::default(),
        }
    }
}
