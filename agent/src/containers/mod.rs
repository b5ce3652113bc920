//! Containers and their processes inside the guest: the [`Manager`] that holds them, the
//! lookups every call starts with, and the errors calls answer with.
//!
//! Each call lives in its own module, the way youki's libcontainer has one file per operation.
//! Forking steps (create, exec) run in the `runner` helper ([`launch`]); steps that don't fork
//! (start, kill --all, pause, resume, delete) call libcontainer directly on a blocking thread.
//! Exit statuses come from the [`Reaper`].

mod create;
mod debug;
pub use create::{provide_ephemeral, reach_submounts, RootfsFrom};
mod delete;
mod exec;
mod files;
pub use files::{put_files, read_file};
mod launch;
mod layers;
mod oom;
mod output;
mod pause;
mod signal;
mod start;
mod stats;
mod stdin;
mod tty;
mod wait;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cocoon_protocol::ProcessRef;
use libcontainer::container::Container as LcContainer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::reaper::Reaper;
use crate::runner::STATE_ROOT;
use crate::stdio::StdioHub;

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

/// An I/O error as an INTERNAL failure that says which step hit it.
fn failed(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::Failed(format!("{what}: {e}"))
}

/// What the agent keeps for a running process's stdio.
#[derive(Debug, Default)]
pub(crate) struct Relays {
    /// A duplicate of the host's stdin stream, for CloseStdin.
    pub(crate) stdin: Option<OwnedFd>,
    /// The pty master, for resizes.
    pub(crate) tty: Option<OwnedFd>,
    /// Fires when the terminal output relay has drained.
    pub(crate) output_done: Option<oneshot::Receiver<()>>,
}

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    /// (exit code, unix nanos) once the process exited and its output was drained.
    exit: wait::Exit,
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
    layers: Arc<layers::Layers>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    /// Processes of the debug console (`debug.rs`), by exec id.
    debug: Mutex<HashMap<String, Arc<Process>>>,
}

/// Ids become file names (bundles, state, console sockets), so they are kept to a safe set.
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

impl Manager {
    pub fn new(reaper: Reaper, hub: Arc<StdioHub>, share: PathBuf) -> Self {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Manager {
            reaper,
            hub,
            share,
            layers: Arc::default(),
            containers: Mutex::new(HashMap::new()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            debug: Mutex::default(),
        }
    }

    /// The containers map; a poisoned lock still holds a consistent map (every update is a
    /// single insert or remove), so it is used as is.
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &str) -> Res<Arc<Container>> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| Failure::NotFound(format!("container {id:?} not found")))
    }

    fn process(&self, p: &ProcessRef) -> Res<Arc<Process>> {
        if p.container_id == cocoon_protocol::DEBUG_CONTAINER {
            return self.debug_process(p.exec_id.as_deref());
        }
        let c = self.get(&p.container_id)?;
        let Some(exec_id) = &p.exec_id else {
            return Ok(c.init.clone());
        };
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        execs.get(exec_id).cloned().ok_or_else(|| {
            Failure::NotFound(format!(
                "exec {exec_id:?} not found in container {:?}",
                p.container_id
            ))
        })
    }
}

/// A second fd for the same file, for a relay or a CloseStdin handle that outlives the first.
fn dup(fd: impl std::os::fd::AsFd) -> Res<OwnedFd> {
    rustix::io::dup(fd).map_err(|e| Failure::Failed(format!("dup: {e}")))
}

/// libcontainer's view of a container, from the state the runner left.
fn load(id: &str) -> Res<LcContainer> {
    LcContainer::load(Path::new(STATE_ROOT).join(id))
        .map_err(|e| Failure::NotFound(format!("container {id:?} state: {e}")))
}

/// Runs a libcontainer step off the runtime thread: they block on files, cgroups and signals.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Failed(format!("worker: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("container", "abc-1.2_3").is_ok());
        for bad in ["", "a/b", "..", ".x", "a b"] {
            assert!(check_id("container", bad).is_err(), "{bad:?}");
        }
    }
}
