//! containerd's Task API (v2), forwarded to the guest agent of the pod's VM.
//!
//! The first container of a shim boots the VM; deleting the last one stops it. Each process's
//! stdio is relayed between containerd's FIFOs and the agent's vsock streams, and the exit is
//! published only after its output streams reached EOF, so nothing is lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent as ag;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self as sttrpc, Code};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use vmm_driver::{Config, VmSpec};

use crate::annotations;
use crate::io::{relay_output, relay_stdin};
use crate::sandbox::{Sandbox, SandboxHandle, StdioKind};
use crate::state::SandboxState;

fn err(code: Code, msg: impl ToString) -> sttrpc::Error {
    sttrpc::Error::RpcStatus(sttrpc::get_status(code, msg))
}

/// Agent errors keep their status code and message for containerd.
fn agent_err(call: &str, e: ttrpc::Error) -> sttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = s.code.enum_value().unwrap_or(Code::UNKNOWN);
            err(code, format!("{call}: {}", s.message))
        }
        other => err(
            Code::UNAVAILABLE,
            format!("{call}: the guest agent did not answer: {other}"),
        ),
    }
}

fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

fn call_ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(std::time::Duration::from_secs(60))
}

fn timestamp(unix_nanos: u64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(unix_nanos / 1_000_000_000).unwrap_or(0);
    t.nanos = i32::try_from(unix_nanos % 1_000_000_000).unwrap_or(0);
    t
}

/// The running relays of one process.
struct Relays {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

/// What containerd told us about a process's stdio.
#[derive(Debug, Clone, Default)]
struct StdioPaths {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

impl StdioPaths {
    fn streams(&self) -> ag::StdioStreams {
        ag::StdioStreams {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    stdio: StdioPaths,
    status: api::Status,
    /// OCI process JSON of an exec, until it starts.
    process_json: Vec<u8>,
    exit: watch::Receiver<Option<(u32, u64)>>,
    exit_tx: Option<watch::Sender<Option<(u32, u64)>>>,
    /// Ends the stdin relay (CloseIO); the relay's handle tells when it has flushed.
    stdin_close: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Proc {
    fn new(stdio: StdioPaths, process_json: Vec<u8>) -> Proc {
        let (tx, rx) = watch::channel(None);
        Proc {
            pid: 0,
            stdio,
            status: api::Status::CREATED,
            process_json,
            exit: rx,
            exit_tx: Some(tx),
            stdin_close: None,
        }
    }
}

#[derive(Debug)]
struct Ctr {
    bundle: String,
    rootfs: PathBuf,
    mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Ctr {
    /// The init process (`exec_id` empty) or an exec.
    fn process(&self, exec_id: &str) -> TtrpcResult<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| not_found(&format!("exec {exec_id}")))
    }

    fn process_mut(&mut self, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| not_found(&format!("exec {exec_id}")))
    }
}

#[derive(Debug, Default)]
struct Pod {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Ctr>,
    state: SandboxState,
    oom_watch: Option<JoinHandle<()>>,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    sandbox_id: String,
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    /// This shim's own ttrpc socket address, removed at shutdown.
    socket: String,
    pod: Arc<Mutex<Pod>>,
    /// Serializes creates: the first one boots the VM.
    create_lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("sandbox_id", &self.sandbox_id)
            .finish_non_exhaustive()
    }
}

impl Pod {
    fn container(&self, id: &str) -> TtrpcResult<&Ctr> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }

    fn container_mut(&mut self, id: &str) -> TtrpcResult<&mut Ctr> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }
}

impl TaskService {
    pub fn new(
        sandbox_id: String,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        socket: String,
    ) -> Self {
        TaskService {
            sandbox_id,
            namespace,
            publisher: Arc::new(publisher),
            exit,
            socket,
            pod: Arc::default(),
            create_lock: Arc::default(),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = containerd_shim_protos::ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event)
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// Boots the pod VM for the first container. The pod lock is taken only to store the
    /// result: State and friends keep answering while the VM boots.
    async fn boot(&self, spec: &serde_json::Value) -> TtrpcResult<()> {
        let cfg = Config::load()
            .map_err(|e| err(Code::FAILED_PRECONDITION, format!("cocoon config: {e}")))?;
        let mut vm = VmSpec::from_config(&cfg, &self.sandbox_id);
        let size = annotations::vm_size(&cfg, spec).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        vm.vcpus = size.vcpus;
        vm.memory_mib = size.memory_mib;
        let sb = Sandbox::boot(&cfg, &vm)
            .await
            .map_err(|e| err(Code::UNAVAILABLE, format!("booting the pod VM: {e}")))?;
        let state = SandboxState {
            sandbox_id: self.sandbox_id.clone(),
            pids: sb
                .vm()
                .pids()
                .into_iter()
                .map(|(n, p)| (n.to_owned(), p))
                .collect(),
            mounts: vec![],
        };
        if let Err(e) = state.save(&sb.run_dir()) {
            log::warn!("saving state.json: {e}");
        }
        let agent = sb.agent().clone();
        let me = self.clone();
        let oom_watch = tokio::spawn(async move {
            while let Ok(e) = agent
                .get_oom_event(no_timeout(), &ag::GetOOMEventRequest::new())
                .await
            {
                let oom = ev::TaskOOM {
                    container_id: e.container_id,
                    ..Default::default()
                };
                me.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(oom))
                    .await;
            }
        });
        let mut pod = self.pod.lock().await;
        pod.state = state;
        pod.oom_watch = Some(oom_watch);
        pod.sandbox = Some(sb);
        Ok(())
    }

    /// One agent call on behalf of a Task RPC: the pod's agent, the call, and its error mapped
    /// to a status containerd understands. The pod lock is not held during the call.
    async fn forward<T, F, Fut>(&self, call: &'static str, f: F) -> TtrpcResult<T>
    where
        F: FnOnce(AgentServiceClient) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let agent = Self::agent(&*self.pod.lock().await)?;
        f(agent).await.map_err(|e| agent_err(call, e))
    }

    /// Pause (freeze) or resume a container, then tell containerd.
    async fn freeze(&self, id: String, pause: bool) -> TtrpcResult<api::Empty> {
        if pause {
            let r = ag::PauseContainerRequest {
                container_id: id.clone(),
                ..Default::default()
            };
            self.forward("pause", |a| async move {
                a.pause_container(call_ctx(), &r).await
            })
            .await?;
        } else {
            let r = ag::ResumeContainerRequest {
                container_id: id.clone(),
                ..Default::default()
            };
            self.forward("resume", |a| async move {
                a.resume_container(call_ctx(), &r).await
            })
            .await?;
        }
        if let Some(c) = self.pod.lock().await.containers.get_mut(&id) {
            c.init.status = if pause {
                api::Status::PAUSED
            } else {
                api::Status::RUNNING
            };
        }
        if pause {
            let e = ev::TaskPaused {
                container_id: id,
                ..Default::default()
            };
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e))
                .await;
        } else {
            let e = ev::TaskResumed {
                container_id: id,
                ..Default::default()
            };
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e))
                .await;
        }
        Ok(api::Empty::new())
    }

    /// Stops the VM once no container is left.
    async fn shutdown_if_empty(&self, pod: &mut Pod) {
        if !pod.containers.is_empty() {
            return;
        }
        if let Some(h) = pod.oom_watch.take() {
            h.abort();
        }
        if let Some(sb) = pod.sandbox.take() {
            let _ = std::fs::remove_file(sb.run_dir().join(crate::state::FILE));
            if let Err(e) = sb.shutdown().await {
                log::warn!("stopping the pod VM: {e}");
            }
        }
    }

    fn agent(pod: &Pod) -> TtrpcResult<AgentServiceClient> {
        pod.sandbox
            .as_ref()
            .map(|s| s.agent().clone())
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the pod VM is not running"))
    }

    /// Opens the streams and starts the FIFO relays of one process.
    async fn wire_stdio(
        sb: &SandboxHandle,
        cid: &str,
        eid: &str,
        p: &StdioPaths,
    ) -> TtrpcResult<Relays> {
        let open = |kind| sb.open_stdio(cid, eid, kind);
        let mut outputs = vec![];
        let mut stdin = None;
        let vm_err = |e: crate::Error| err(Code::UNAVAILABLE, format!("stdio stream: {e}"));
        if !p.stdin.is_empty() {
            let s = open(StdioKind::Stdin).await.map_err(vm_err)?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            stdin = Some((tx, relay_stdin(p.stdin.clone(), s, rx)));
        }
        if !p.stdout.is_empty() {
            let s = open(StdioKind::Stdout).await.map_err(vm_err)?;
            outputs.push(relay_output(s, p.stdout.clone()));
        }
        if !p.stderr.is_empty() && !p.terminal {
            let s = open(StdioKind::Stderr).await.map_err(vm_err)?;
            outputs.push(relay_output(s, p.stderr.clone()));
        }
        Ok(Relays { outputs, stdin })
    }

    /// Waits for a process's exit in the guest and its output to drain, then publishes it.
    fn watch_exit(
        &self,
        agent: AgentServiceClient,
        cid: String,
        eid: String,
        pid: u32,
        outputs: Vec<JoinHandle<()>>,
        tx: watch::Sender<Option<(u32, u64)>>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = ag::WaitProcessRequest {
                container_id: cid.clone(),
                exec_id: eid.clone(),
                ..Default::default()
            };
            let (status, at) = match agent.wait_process(no_timeout(), &req).await {
                Ok(r) => (
                    u32::try_from(r.status).unwrap_or(255),
                    r.exited_at_unix_nanos,
                ),
                Err(e) => {
                    let died = me
                        .pod
                        .lock()
                        .await
                        .sandbox
                        .as_mut()
                        .and_then(Sandbox::vm_exit);
                    match died {
                        Some(why) => {
                            log::error!("pod VM {} died; {cid}/{eid} is lost: {why}", me.sandbox_id)
                        }
                        None => {
                            log::error!("lost the guest agent while waiting for {cid}/{eid}: {e}")
                        }
                    }
                    (255, now_nanos())
                }
            };
            for o in outputs {
                let _ = o.await;
            }
            {
                let mut pod = me.pod.lock().await;
                if let Ok(p) = pod.container_mut(&cid).and_then(|c| c.process_mut(&eid)) {
                    p.status = api::Status::STOPPED;
                }
            }
            log::info!(
                "phase exited {cid}{}",
                if eid.is_empty() {
                    String::new()
                } else {
                    format!("/{eid}")
                }
            );
            let _ = tx.send(Some((status, at)));
            let exit = ev::TaskExit {
                container_id: cid.clone(),
                id: if eid.is_empty() { cid.clone() } else { eid },
                pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at)),
                ..Default::default()
            };
            me.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(exit))
                .await;
        });
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0))
}

fn not_found(what: &str) -> sttrpc::Error {
    err(Code::NOT_FOUND, format!("{what} not found"))
}

/// Mounts containerd's rootfs mounts (or binds the bundle's rootfs) at `target`.
async fn mount_rootfs(
    req: &api::CreateTaskRequest,
    spec: &serde_json::Value,
    target: &Path,
) -> TtrpcResult<()> {
    std::fs::create_dir_all(target)
        .map_err(|e| err(Code::INTERNAL, format!("create {}: {e}", target.display())))?;
    if req.rootfs.is_empty() {
        let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
        let src = Path::new(&req.bundle).join(root);
        let m = api::Mount {
            type_: "bind".into(),
            source: src.display().to_string(),
            options: vec!["rbind".into()],
            ..Default::default()
        };
        return containerd_shim::asynchronous::util::mount_rootfs(&m, target)
            .await
            .map_err(|e| err(Code::INTERNAL, format!("bind the rootfs: {e}")));
    }
    for m in &req.rootfs {
        containerd_shim::asynchronous::util::mount_rootfs(m, target)
            .await
            .map_err(|e| {
                err(
                    Code::INTERNAL,
                    format!("mount the rootfs ({}): {e}", m.type_),
                )
            })?;
    }
    Ok(())
}

fn unmount(target: &Path) {
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        log::warn!("unmount {}: {e}", target.display());
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let cid = req.id.clone();
        let spec_bytes =
            std::fs::read(Path::new(&req.bundle).join("config.json")).map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("read {}/config.json: {e}", req.bundle),
                )
            })?;
        let spec: serde_json::Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("config.json: {e}")))?;
        annotations::check(&spec).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;

        log::info!("phase create-begin {cid}");
        let _creating = self.create_lock.lock().await;
        if self.pod.lock().await.containers.contains_key(&cid) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {cid} already exists"),
            ));
        }
        if self.pod.lock().await.sandbox.is_none() {
            self.boot(&spec).await?;
        }
        let (sb, run_dir) = {
            let pod = self.pod.lock().await;
            let sb = pod
                .sandbox
                .as_ref()
                .ok_or_else(|| err(Code::INTERNAL, "no sandbox"))?;
            (sb.handle(), sb.run_dir())
        };
        let rootfs = sb.shared_dir.join(&cid).join("rootfs");
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };

        let created = async {
            mount_rootfs(&req, &spec, &rootfs).await?;
            let relays = Self::wire_stdio(&sb, &cid, "", &stdio).await?;
            let creq = ag::CreateContainerRequest {
                container_id: cid.clone(),
                oci_spec_json: spec_bytes.clone(),
                rootfs: format!("{cid}/rootfs"),
                stdio: MessageField::some(stdio.streams()),
                ..Default::default()
            };
            let pid = sb
                .agent
                .create_container(call_ctx(), &creq)
                .await
                .map_err(|e| agent_err("create", e))?
                .pid;
            Ok::<_, sttrpc::Error>((pid, relays))
        }
        .await;
        let (pid, relays) = match created {
            Ok(v) => v,
            Err(e) => {
                unmount(&rootfs);
                let _ = std::fs::remove_dir_all(sb.shared_dir.join(&cid));
                let mut pod = self.pod.lock().await;
                self.shutdown_if_empty(&mut pod).await;
                return Err(e);
            }
        };
        let mut init = Proc::new(stdio, vec![]);
        init.pid = pid;
        init.stdin_close = relays.stdin;
        if let Some(tx) = init.exit_tx.take() {
            self.watch_exit(
                sb.agent.clone(),
                cid.clone(),
                String::new(),
                pid,
                relays.outputs,
                tx,
            );
        }
        let mut pod = self.pod.lock().await;
        pod.state.mounts.push(rootfs.clone());
        let _ = pod.state.save(&run_dir);
        pod.containers.insert(
            cid.clone(),
            Ctr {
                bundle: req.bundle.clone(),
                rootfs,
                mounted: true,
                init,
                execs: HashMap::new(),
            },
        );
        drop(pod);
        log::info!("phase created {cid}");

        let event = ev::TaskCreate {
            container_id: cid,
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(ev::TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if req.exec_id.is_empty() {
            let agent = {
                let pod = self.pod.lock().await;
                pod.container(&req.id)?;
                Self::agent(&pod)?
            };
            let sreq = ag::StartContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            let pid = agent
                .start_container(call_ctx(), &sreq)
                .await
                .map_err(|e| agent_err("start", e))?
                .pid;
            if let Some(c) = self.pod.lock().await.containers.get_mut(&req.id) {
                c.init.status = api::Status::RUNNING;
            }
            log::info!("phase started {}", req.id);
            let e = ev::TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(e))
                .await;
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let (sb, stdio, process_json) = {
            let pod = self.pod.lock().await;
            let p = pod.container(&req.id)?.process(&req.exec_id)?;
            let sb = pod
                .sandbox
                .as_ref()
                .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the pod VM is not running"))?;
            (sb.handle(), p.stdio.clone(), p.process_json.clone())
        };
        let relays = Self::wire_stdio(&sb, &req.id, &req.exec_id, &stdio).await?;
        let ereq = ag::ExecProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            process_json,
            stdio: MessageField::some(stdio.streams()),
            ..Default::default()
        };
        let pid = sb
            .agent
            .exec_process(call_ctx(), &ereq)
            .await
            .map_err(|e| agent_err("exec", e))?
            .pid;
        let tx = self
            .pod
            .lock()
            .await
            .containers
            .get_mut(&req.id)
            .and_then(|c| c.execs.get_mut(&req.exec_id))
            .and_then(|p| {
                p.pid = pid;
                p.status = api::Status::RUNNING;
                p.stdin_close = relays.stdin;
                p.exit_tx.take()
            });
        if let Some(tx) = tx {
            self.watch_exit(
                sb.agent.clone(),
                req.id.clone(),
                req.exec_id.clone(),
                pid,
                relays.outputs,
                tx,
            );
        }
        let e = ev::TaskExecStarted {
            container_id: req.id,
            exec_id: req.exec_id,
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e))
            .await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut pod = self.pod.lock().await;
        let c = pod.container_mut(&req.id)?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        c.execs.insert(req.exec_id.clone(), Proc::new(stdio, json));
        drop(pod);
        let e = ev::TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e))
            .await;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pod = self.pod.lock().await;
        let c = pod.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = *p.exit.borrow();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.clone(),
            pid: p.pid,
            status: if exit.is_some() {
                api::Status::STOPPED
            } else {
                p.status
            }
            .into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.0),
            exited_at: MessageField::from_option(exit.map(|e| timestamp(e.1))),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let pod = self.pod.lock().await;
            pod.container(&req.id)?.process(&req.exec_id)?.exit.clone()
        };
        let v = *rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| err(Code::INTERNAL, "exit watcher gone"))?;
        let (status, at) = v.unwrap_or((255, 0));
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let r = ag::SignalProcessRequest {
            container_id: req.id,
            exec_id: req.exec_id,
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        self.forward(
            "kill",
            |a| async move { a.signal_process(call_ctx(), &r).await },
        )
        .await?;
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut pod = self.pod.lock().await;
        let c = pod.container_mut(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            let exit = (*p.exit.borrow()).unwrap_or((0, now_nanos()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: exit.0,
                exited_at: MessageField::some(timestamp(exit.1)),
                ..Default::default()
            });
        }
        let agent = Self::agent(&pod)?;
        let rreq = ag::RemoveContainerRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        if let Err(e) = agent.remove_container(call_ctx(), &rreq).await {
            log::warn!("removing {} in the guest: {e}", req.id);
        }
        let Some(c) = pod.containers.remove(&req.id) else {
            return Err(not_found(&req.id));
        };
        if c.mounted {
            unmount(&c.rootfs);
        }
        if let Some(dir) = c.rootfs.parent() {
            let _ = std::fs::remove_dir(&c.rootfs);
            let _ = std::fs::remove_dir(dir);
        }
        pod.state.mounts.retain(|m| m != &c.rootfs);
        if let Some(sb) = pod.sandbox.as_ref() {
            let _ = pod.state.save(&sb.run_dir());
        }
        let exit = (*c.init.exit.borrow()).unwrap_or((137, now_nanos()));
        self.shutdown_if_empty(&mut pod).await;
        drop(pod);
        log::info!("phase deleted {}", req.id);
        let e = ev::TaskDelete {
            container_id: req.id.clone(),
            id: req.id,
            pid: c.init.pid,
            exit_status: exit.0,
            exited_at: MessageField::some(timestamp(exit.1)),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(e))
            .await;
        Ok(api::DeleteResponse {
            pid: c.init.pid,
            exit_status: exit.0,
            exited_at: MessageField::some(timestamp(exit.1)),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let r = ag::ListProcessesRequest {
            container_id: req.id,
            ..Default::default()
        };
        let r = self
            .forward(
                "pids",
                |a| async move { a.list_processes(call_ctx(), &r).await },
            )
            .await?;
        let processes = r
            .pids
            .into_iter()
            .map(|pid| api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.freeze(req.id, false).await
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let r = ag::TtyWinResizeRequest {
            container_id: req.id,
            exec_id: req.exec_id,
            rows: req.height,
            cols: req.width,
            ..Default::default()
        };
        self.forward("resize", |a| async move {
            a.tty_win_resize(call_ctx(), &r).await
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        // Our relay forwards what containerd wrote, then half-closes the stream: the process
        // reads all of it and then EOF. Closing in the guest first could drop buffered input.
        let relay = {
            let mut pod = self.pod.lock().await;
            let c = pod.container_mut(&req.id)?;
            c.process_mut(&req.exec_id)
                .ok()
                .and_then(|p| p.stdin_close.take())
        };
        if let Some((close, done)) = relay {
            let _ = close.send(());
            let _ = done.await;
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let json = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let r = ag::UpdateContainerRequest {
            container_id: req.id,
            resources_json: json,
            ..Default::default()
        };
        self.forward("update", |a| async move {
            a.update_container(call_ctx(), &r).await
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim_protos::cgroups_v2::metrics as m;
        use containerd_shim_protos::protobuf::Message;
        let r = ag::StatsContainerRequest {
            container_id: req.id,
            ..Default::default()
        };
        let s = self
            .forward("stats", |a| async move {
                a.stats_container(call_ctx(), &r).await
            })
            .await?;
        let metrics = m::Metrics {
            pids: MessageField::some(m::PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            cpu: MessageField::some(m::CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                ..Default::default()
            }),
            memory: MessageField::some(m::MemoryStat {
                usage: s.memory_usage_bytes,
                usage_limit: s.memory_limit_bytes,
                anon: s.memory_anon_bytes,
                file: s.memory_file_bytes,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics
            .write_to_bytes()
            .map_err(|e| err(Code::INTERNAL, e))?;
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pod = self.pod.lock().await;
        let task_pid = pod.containers.get(&req.id).map_or(0, |c| c.init.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut pod = self.pod.lock().await;
        if !pod.containers.is_empty() {
            return Ok(api::Empty::new());
        }
        self.shutdown_if_empty(&mut pod).await;
        // Unlink the socket now: the connection serving this call stays up, and nothing new
        // may connect to a shim that is going away.
        if let Err(e) = std::fs::remove_file(crate::service::socket_file(&self.socket)) {
            log::debug!("removing {}: {e}", self.socket);
        }
        self.exit.signal();
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "checkpoint is not supported by the cocoon runtime (VM-isolated pods cannot be checkpointed with CRIU)"))
    }
}
