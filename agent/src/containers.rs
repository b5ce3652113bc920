//! Containers and their processes inside the guest.
//!
//! Forking steps (create, exec) run in the `runner` helper; steps that don't fork (start,
//! kill --all, pause, resume, delete) call libcontainer directly on a blocking thread. Exit
//! statuses come from the [`Reaper`].

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cocoon_protocol::agent::{StatsContainerResponse, StdioStreams};
use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::Container as LcContainer;
use libcontainer::signal::Signal as LcSignal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_vsock::VsockStream;

use crate::reaper::Reaper;
use crate::runner::{self, Invocation, Job, STATE_ROOT};
use crate::spec;
use crate::stdio::{into_blocking_fd, StdioHub};

/// Where the agent writes bundles (config.json, exec process files, runner results).
const BUNDLES: &str = "/run/cocoon/bundles";
/// Console sockets for terminal processes.
const TTY_DIR: &str = "/run/cocoon/tty";
/// How long the host may take to connect a process's stdio streams.
const STREAM_WAIT: Duration = Duration::from_secs(10);
/// How often memory.events is read for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(100);

/// Why a call failed, mapped onto ttrpc status codes.
#[derive(Debug)]
pub enum Failure {
    NotFound(String),
    Invalid(String),
    Exists(String),
    Failed(String),
}

impl From<Failure> for ttrpc::Error {
    fn from(f: Failure) -> Self {
        use ttrpc::Code;
        let (code, msg) = match f {
            Failure::NotFound(m) => (Code::NOT_FOUND, m),
            Failure::Invalid(m) => (Code::INVALID_ARGUMENT, m),
            Failure::Exists(m) => (Code::ALREADY_EXISTS, m),
            Failure::Failed(m) => (Code::INTERNAL, m),
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
    }
}

type Res<T> = Result<T, Failure>;

fn failed(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::Failed(format!("{what}: {e}"))
}

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    /// (exit code, unix nanos) once the process exited and its output was drained.
    exit: watch::Receiver<Option<(i32, u64)>>,
    /// A duplicate of the host's stdin stream, to shut its read side on CloseStdin.
    stdin: Mutex<Option<OwnedFd>>,
    /// The pty master of a terminal process, for resizes.
    tty: Option<OwnedFd>,
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    oom_watch: JoinHandle<()>,
}

/// All containers of the sandbox.
#[derive(Debug)]
pub struct Manager {
    reaper: Reaper,
    hub: Arc<StdioHub>,
    share: PathBuf,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

fn check_id(kind: &str, id: &str) -> Res<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Failure::Invalid(format!(
            "{kind} id {id:?} must be 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Where a container's rootfs lives, refusing anything that leaves the share.
pub fn resolve_rootfs(share: &Path, rel: &str) -> Res<PathBuf> {
    let p = Path::new(rel);
    let escapes = rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)));
    if escapes {
        return Err(Failure::Invalid(format!(
            "rootfs {rel:?} is outside the shared directory: give a path relative to the share, like <container>/rootfs"
        )));
    }
    let full = share.join(p);
    let real = full.canonicalize().map_err(|_| {
        Failure::NotFound(format!(
            "rootfs {rel:?} does not exist on the share ({})",
            full.display()
        ))
    })?;
    let share_real = share.canonicalize().map_err(failed("resolve the share"))?;
    if !real.starts_with(&share_real) {
        return Err(Failure::Invalid(format!(
            "rootfs {rel:?} resolves outside the shared directory"
        )));
    }
    if !real.is_dir() {
        return Err(Failure::Invalid(format!(
            "rootfs {rel:?} is not a directory"
        )));
    }
    Ok(real)
}

/// Receives the pty master libcontainer sends over the console socket.
fn recv_master(sock: &std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let mut buf = [0u8; 4096];
    rustix::net::recvmsg(
        sock,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut anc,
        RecvFlags::empty(),
    )?;
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(std::io::Error::other(
        "no pty master received on the console socket",
    ))
}

/// Copies until EOF or error on a plain thread (pty and sockets in blocking mode).
fn relay_thread(name: &str, mut from: File, mut to: File, done: Option<oneshot::Sender<()>>) {
    let name = name.to_owned();
    let spawned = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let r = std::io::copy(&mut from, &mut to);
            log::debug!("relay ended: {r:?}");
            if let Some(d) = done {
                let _ = d.send(());
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the {name} relay: {e}");
    }
}

impl Manager {
    pub fn new(reaper: Reaper, hub: Arc<StdioHub>, share: PathBuf) -> Self {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Manager {
            reaper,
            hub,
            share,
            containers: Mutex::new(HashMap::new()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        }
    }

    fn get(&self, id: &str) -> Res<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Failure::NotFound(format!("container {id:?} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Res<Arc<Process>> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        execs.get(exec_id).cloned().ok_or_else(|| {
            Failure::NotFound(format!("exec {exec_id:?} not found in container {id:?}"))
        })
    }

    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        stdio: &StdioStreams,
    ) -> Res<i32> {
        check_id("container", id)?;
        if self.get(id).is_ok() {
            return Err(Failure::Exists(format!("container {id:?} already exists")));
        }
        let result = self.create_inner(id, spec_json, rootfs, stdio).await;
        if result.is_err() {
            self.hub.discard(id, "");
            let _ = std::fs::remove_dir_all(Path::new(BUNDLES).join(id));
            let _ = tokio::task::spawn_blocking({
                let id = id.to_owned();
                move || delete_state(&id)
            })
            .await;
        }
        result
    }

    async fn create_inner(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        stdio: &StdioStreams,
    ) -> Res<i32> {
        let root = resolve_rootfs(&self.share, rootfs)?;
        let spec = spec::adapt(spec_json, id, &root, |p| Path::new(p).exists())
            .map_err(|e| Failure::Invalid(e.0))?;
        let bundle = Path::new(BUNDLES).join(id);
        std::fs::create_dir_all(&bundle).map_err(failed("create the bundle"))?;
        std::fs::write(bundle.join("config.json"), spec.to_string())
            .map_err(failed("write config.json"))?;
        let job = Job::Create {
            id: id.to_owned(),
            bundle: bundle.clone(),
        };
        let init = self.launch(id, "", &bundle, job, stdio).await?;
        let pid = init.pid;
        let oom_watch = tokio::spawn(watch_oom(id.to_owned(), self.oom_tx.clone()));
        let c = Container {
            bundle,
            init,
            execs: Mutex::new(HashMap::new()),
            oom_watch,
        };
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), Arc::new(c));
        log::info!("container {id} created (init pid {pid})");
        Ok(pid)
    }

    /// Runs the helper for `job` with the process's stdio wired up, and tracks the process.
    async fn launch(
        &self,
        cid: &str,
        eid: &str,
        bundle: &Path,
        job: Job,
        stdio: &StdioStreams,
    ) -> Res<Arc<Process>> {
        let tag = if eid.is_empty() { "init" } else { eid };
        let t0 = std::time::Instant::now();
        let result = bundle.join(format!("runner-{tag}.json"));
        let _ = std::fs::remove_file(&result);
        let take = |kind: &'static str| self.hub.take(cid, eid, kind, STREAM_WAIT);
        let stream = |on: bool, kind: &'static str| async move {
            if on {
                take(kind).await.map(Some).map_err(Failure::Failed)
            } else {
                Ok(None)
            }
        };
        let host_stdin: Option<VsockStream> = stream(stdio.stdin, "stdin").await?;
        let mut host_stdout: Option<VsockStream> = stream(stdio.stdout, "stdout").await?;
        let host_stderr: Option<VsockStream> =
            stream(stdio.stderr && !stdio.terminal, "stderr").await?;

        let mut cmd = Command::new("/proc/self/exe");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut console = None;
        let mut stdin_pipe = None;
        if stdio.terminal {
            std::fs::create_dir_all(TTY_DIR).map_err(failed("create the tty dir"))?;
            let path = Path::new(TTY_DIR).join(format!("{cid}-{tag}.sock"));
            let _ = std::fs::remove_file(&path);
            let l = std::os::unix::net::UnixListener::bind(&path)
                .map_err(failed("bind the console socket"))?;
            console = Some((l, path));
        } else {
            if host_stdin.is_some() {
                let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                    .map_err(|e| Failure::Failed(format!("stdin pipe: {e}")))?;
                cmd.stdin(Stdio::from(r));
                stdin_pipe = Some(w);
            }
            if let Some(s) = host_stdout.take() {
                cmd.stdout(Stdio::from(
                    into_blocking_fd(s).map_err(failed("stdout stream"))?,
                ));
            }
            if let Some(s) = host_stderr {
                cmd.stderr(Stdio::from(
                    into_blocking_fd(s).map_err(failed("stderr stream"))?,
                ));
            }
        }
        let inv = Invocation {
            job,
            result: result.clone(),
            console_socket: console.as_ref().map(|(_, p)| p.clone()),
        };
        cmd.args(inv.to_args());
        let t1 = std::time::Instant::now();
        let child = cmd.spawn().map_err(failed("start the runner"))?;
        drop(cmd);
        let helper_pid = i32::try_from(child.id()).unwrap_or(0);
        drop(child); // reaped by the Reaper, never waited on here
        let code = self.reaper.wait(helper_pid).await;
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "{cid}/{tag}: stdio streams {} ms, runner {} ms: {}",
                (t1 - t0).as_millis(),
                t1.elapsed().as_millis(),
                std::fs::read_to_string(&result).unwrap_or_default()
            );
        }
        let pid = runner::read_result(&result).map_err(|e| {
            if code == 0 {
                Failure::Failed(e)
            } else {
                Failure::Invalid(format!("cannot start the process: {e}"))
            }
        })?;

        // Wire up stdio that the agent relays: stdin of plain processes, and terminals.
        let mut output_done = None;
        let mut stdin_dup = None;
        let mut tty = None;
        if let Some((listener, path)) = console {
            listener
                .set_nonblocking(false)
                .map_err(failed("console socket"))?;
            let (conn, _) = listener
                .accept()
                .map_err(failed("accept on the console socket"))?;
            let _ = std::fs::remove_file(&path);
            let master = recv_master(&conn).map_err(failed("receive the pty master"))?;
            let dup = |fd: &OwnedFd| {
                rustix::io::dup(fd)
                    .map(File::from)
                    .map_err(|e| Failure::Failed(format!("dup: {e}")))
            };
            if let Some(s) = host_stdout {
                let (tx, rx) = oneshot::channel();
                let out = File::from(into_blocking_fd(s).map_err(failed("stdout stream"))?);
                relay_thread("tty-out", dup(&master)?, out, Some(tx));
                output_done = Some(rx);
            }
            if let Some(s) = host_stdin {
                let fd = into_blocking_fd(s).map_err(failed("stdin stream"))?;
                stdin_dup =
                    Some(rustix::io::dup(&fd).map_err(|e| Failure::Failed(format!("dup: {e}")))?);
                relay_thread("tty-in", File::from(fd), dup(&master)?, None);
            }
            tty = Some(master);
        } else if let (Some(s), Some(w)) = (host_stdin, stdin_pipe) {
            stdin_dup =
                Some(rustix::io::dup(&s).map_err(|e| Failure::Failed(format!("dup: {e}")))?);
            let mut sink =
                tokio::net::unix::pipe::Sender::from_owned_fd(w).map_err(failed("stdin pipe"))?;
            tokio::spawn(async move {
                let mut s = s;
                let r = tokio::io::copy(&mut s, &mut sink).await;
                log::debug!("stdin relay ended: {r:?}");
            });
        }

        let (tx, rx) = watch::channel(None);
        let reaper = self.reaper.clone();
        tokio::spawn(async move {
            let code = reaper.wait(pid).await;
            if let Some(done) = output_done {
                let _ = done.await;
            }
            let _ = tx.send(Some((code, now_nanos())));
        });
        Ok(Arc::new(Process {
            pid,
            exit: rx,
            stdin: Mutex::new(stdin_dup),
            tty,
        }))
    }

    pub async fn start(&self, id: &str) -> Res<i32> {
        let c = self.get(id)?;
        let cid = id.to_owned();
        blocking(move || {
            load(&cid)?
                .start()
                .map_err(|e| Failure::Failed(format!("start: {e}")))
        })
        .await?;
        log::info!("container {id} started");
        Ok(c.init.pid)
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &StdioStreams,
    ) -> Res<i32> {
        check_id("exec", exec_id)?;
        let c = self.get(id)?;
        if c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(exec_id)
        {
            return Err(Failure::Exists(format!(
                "exec {exec_id:?} already exists in container {id:?}"
            )));
        }
        let process = spec::check_process(process_json).map_err(|e| Failure::Invalid(e.0))?;
        let path = c.bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&path, process.to_string()).map_err(failed("write the exec process"))?;
        let job = Job::Exec {
            id: id.to_owned(),
            process: path,
        };
        let p = self
            .launch(id, exec_id, &c.bundle, job, stdio)
            .await
            .inspect_err(|_| self.hub.discard(id, exec_id))?;
        let pid = p.pid;
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_owned(), p);
        Ok(pid)
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Res<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| Failure::Invalid(format!("{signal} is not a signal number")))?;
        if all {
            self.get(id)?;
            let cid = id.to_owned();
            let lc_sig =
                LcSignal::try_from(sig as i32).map_err(|e| Failure::Invalid(e.to_string()))?;
            return blocking(move || {
                load(&cid)?
                    .kill(lc_sig, true)
                    .map_err(|e| Failure::Failed(format!("kill: {e}")))
            })
            .await;
        }
        let p = self.process(id, exec_id)?;
        if p.exit.borrow().is_some() {
            return Err(Failure::NotFound(format!(
                "process {} of {id:?} has already exited",
                p.pid
            )));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
            .map_err(|e| Failure::Failed(format!("kill {}: {e}", p.pid)))
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Res<(i32, u64)> {
        let p = self.process(id, exec_id)?;
        let mut rx = p.exit.clone();
        let v = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Failure::Failed("exit watcher died".into()))?;
        Ok(v.unwrap_or((255, 0)))
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Res<()> {
        let p = self.process(id, exec_id)?;
        let master = p
            .tty
            .as_ref()
            .ok_or_else(|| Failure::Invalid(format!("process {} has no terminal", p.pid)))?;
        let ws = rustix::termios::Winsize {
            ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
            ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(master, ws)
            .map_err(|e| Failure::Failed(format!("resize: {e}")))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Res<()> {
        let p = self.process(id, exec_id)?;
        if let Some(fd) = p.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The relay sees EOF, forwards what it has, and closes the process's stdin.
            let _ = rustix::net::shutdown(&fd, rustix::net::Shutdown::Read);
        }
        Ok(())
    }

    fn cgroup(&self, id: &str) -> Res<libcgroups::common::AnyCgroupManager> {
        self.get(id)?;
        libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: PathBuf::from(spec::cgroup_path(id)),
            systemd_cgroup: false,
            container_name: id.to_owned(),
        })
        .map_err(|e| Failure::Failed(format!("cgroup of {id}: {e}")))
    }

    pub fn pids(&self, id: &str) -> Res<Vec<u32>> {
        let pids = self
            .cgroup(id)?
            .get_all_pids()
            .map_err(|e| Failure::Failed(format!("list pids: {e}")))?;
        Ok(pids
            .into_iter()
            .filter_map(|p| u32::try_from(p.as_raw()).ok())
            .collect())
    }

    pub fn stats(&self, id: &str) -> Res<StatsContainerResponse> {
        let s = self
            .cgroup(id)?
            .stats()
            .map_err(|e| Failure::Failed(format!("stats: {e}")))?;
        let limit = |v: u64| if v == u64::MAX { 0 } else { v };
        Ok(StatsContainerResponse {
            cpu_usage_usec: s.cpu.usage.usage_total,
            cpu_user_usec: s.cpu.usage.usage_user,
            cpu_system_usec: s.cpu.usage.usage_kernel,
            memory_usage_bytes: s.memory.memory.usage,
            memory_limit_bytes: limit(s.memory.memory.limit),
            memory_anon_bytes: s.memory.stats.get("anon").copied().unwrap_or(0),
            memory_file_bytes: s.memory.stats.get("file").copied().unwrap_or(0),
            pids_current: s.pids.current,
            pids_limit: limit(s.pids.limit),
            ..Default::default()
        })
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Res<()> {
        let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| Failure::Invalid(format!("resources are not valid: {e}")))?;
        let opt = ControllerOpt {
            resources: &r,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        self.cgroup(id)?
            .apply(&opt)
            .map_err(|e| Failure::Failed(format!("update: {e}")))
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Res<()> {
        self.get(id)?;
        let cid = id.to_owned();
        blocking(move || {
            let mut c = load(&cid)?;
            let r = if pause { c.pause() } else { c.resume() };
            r.map_err(|e| {
                Failure::Failed(format!("{}: {e}", if pause { "pause" } else { "resume" }))
            })
        })
        .await
    }

    /// Waits for the next OOM kill in any container.
    pub async fn next_oom(&self) -> Res<String> {
        self.oom_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| Failure::Failed("OOM watcher gone".into()))
    }

    pub async fn remove(&self, id: &str) -> Res<()> {
        let c = self.get(id)?;
        c.oom_watch.abort();
        let cid = id.to_owned();
        blocking(move || delete_state(&cid)).await?;
        let _ = std::fs::remove_dir_all(&c.bundle);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.hub.discard(id, "");
        log::info!("container {id} removed");
        Ok(())
    }
}

fn load(id: &str) -> Res<LcContainer> {
    LcContainer::load(Path::new(STATE_ROOT).join(id))
        .map_err(|e| Failure::NotFound(format!("container {id:?} state: {e}")))
}

/// Kills what is left and removes the cgroup and libcontainer state; fine if there is none.
fn delete_state(id: &str) -> Res<()> {
    if !Path::new(STATE_ROOT).join(id).exists() {
        return Ok(());
    }
    load(id)?
        .delete(true)
        .map_err(|e| Failure::Failed(format!("delete {id}: {e}")))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Failed(format!("worker: {e}")))?
}

/// `oom_kill` from a cgroup v2 memory.events file.
pub fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn watch_oom(id: String, tx: mpsc::UnboundedSender<String>) {
    let path = Path::new("/sys/fs/cgroup")
        .join(spec::cgroup_path(&id).trim_start_matches('/'))
        .join("memory.events");
    let mut seen = 0;
    loop {
        tokio::time::sleep(OOM_POLL).await;
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        let n = oom_kills(&text);
        if n > seen {
            log::info!("container {id}: OOM kill ({n} so far)");
            seen = n;
            if tx.send(id.clone()).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_must_stay_inside_the_share() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(share.path().join("c1/rootfs")).unwrap();
        std::os::unix::fs::symlink("/", share.path().join("escape")).unwrap();
        assert!(resolve_rootfs(share.path(), "c1/rootfs").is_ok());
        for bad in ["/etc", "../x", "c1/../../x", "", "escape"] {
            assert!(
                matches!(resolve_rootfs(share.path(), bad), Err(Failure::Invalid(_))),
                "{bad:?} should be refused"
            );
        }
        assert!(matches!(
            resolve_rootfs(share.path(), "c2/rootfs"),
            Err(Failure::NotFound(_))
        ));
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("container", "abc-1.2_3").is_ok());
        for bad in ["", "a/b", "..", ".x", "a b"] {
            assert!(check_id("container", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oom_kill_counter() {
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n"),
            2
        );
        assert_eq!(oom_kills(""), 0);
    }
}
