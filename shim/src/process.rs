//! What one process of a pod owns on the host: the stdio paths containerd gave it, the relays
//! between those FIFOs and the guest's stdio streams, its status and its exit.
//!
//! A container is its init process plus its exec processes ([`Container`]). The exit watcher
//! that fills in [`Exit`] lives with the pod (`pod::Pod::watch_exit`), because a lost agent
//! is a pod-level event.

use std::collections::HashMap;
use std::path::PathBuf;

use cocoon_protocol::agent as ag;
use cocoon_protocol::{ProcessRef, StdioHello, StdioKind};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::guest::GuestLink;
use crate::io::{relay_stdin, Outputs};
use crate::{Error, Result};

/// What containerd told us about a process's stdio (FIFO paths; empty means none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// Which streams the guest should expect: a terminal merges stderr into stdout.
    pub fn streams(&self) -> ag::StdioStreams {
        ag::StdioStreams {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// How a process ended: the shell's exit code (code, or 128+signal) and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at_unix_nanos: u64,
}

impl Exit {
    /// An exit observed now, e.g. of a process lost with its VM.
    pub fn now(status: u32) -> Exit {
        Exit {
            status,
            at_unix_nanos: now_nanos(),
        }
    }
}

pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0))
}

/// A process's state as containerd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// Ends the stdin relay (containerd's CloseIO); the handle tells when it has flushed.
pub type StdinCloser = (oneshot::Sender<()>, JoinHandle<()>);

/// The relays of one process once its streams are open.
#[derive(Debug)]
pub struct Relays {
    /// Output relays; the exit is published only after they all finish.
    pub outputs: Outputs,
    pub stdin: Option<StdinCloser>,
}

impl Relays {
    /// The relays with what starting their process gave, or, if it failed, the error with
    /// the relays stopped ([`Outputs::abort`]): their streams may never close on their own (a
    /// guest that stopped answering) while their reader (`ctr`) waits for the FIFOs to.
    pub fn kept_if<T>(self, started: Result<T>) -> Result<(T, Relays)> {
        match started {
            Ok(v) => Ok((v, self)),
            Err(e) => {
                self.outputs.abort();
                if let Some((_, stdin)) = self.stdin {
                    stdin.abort();
                }
                Err(e)
            }
        }
    }
}

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    pub stdio: StdioPaths,
    pub status: Status,
    /// OCI process JSON of an exec, until it starts.
    pub spec_json: Vec<u8>,
    exit: watch::Receiver<Option<Exit>>,
    /// Taken by the exit watcher when the process starts.
    exit_tx: Option<watch::Sender<Option<Exit>>>,
    pub stdin_close: Option<StdinCloser>,
}

impl Process {
    pub fn new(stdio: StdioPaths, spec_json: Vec<u8>) -> Process {
        let (tx, rx) = watch::channel(None);
        Process {
            pid: 0,
            stdio,
            status: Status::Created,
            spec_json,
            exit: rx,
            exit_tx: Some(tx),
            stdin_close: None,
        }
    }

    /// Records that the process exists in the guest as `pid` with this stdin relay; returns the
    /// sender its exit watcher reports through (once: a process is attached once).
    pub fn attach(
        &mut self,
        pid: u32,
        stdin: Option<StdinCloser>,
    ) -> Option<watch::Sender<Option<Exit>>> {
        self.pid = pid;
        self.stdin_close = stdin;
        self.exit_tx.take()
    }

    /// Ends a process that never ran (its start failed) with exit status 255, the status of a
    /// process the shim could not run; no watcher will report anything for it.
    pub fn fail_to_start(&mut self) {
        if let Some(tx) = self.exit_tx.take() {
            let _ = tx.send(Some(Exit::now(255)));
        }
    }

    /// The exit, once there is one.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// A receiver to wait for the exit on without holding the pod lock.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// The status, with an exit taking precedence.
    pub fn current_status(&self) -> Status {
        if self.exit().is_some() {
            Status::Stopped
        } else {
            self.status
        }
    }
}

/// One container of the pod.
#[derive(Debug)]
pub struct Container {
    pub bundle: String,
    /// Where its rootfs is mounted on the host; `None` for one the guest assembled from
    /// layer disks.
    pub rootfs: Option<PathBuf>,
    /// The disks its rootfs uses (`pod/layer_rootfs.rs`).
    pub layers: crate::layers::LayerUse,
    /// Where its volumes are bound on the host (`crate::volumes`).
    pub volumes: Vec<PathBuf>,
    /// The names of the host files copied into the guest for it (`volumes::copied`).
    pub copies: Vec<String>,
    /// The spec's OCI hooks still to run on the host (`pod/hooks.rs`), `Null` if none.
    pub hooks: serde_json::Value,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    pub fn process(&self, exec_id: Option<&str>) -> Result<&Process> {
        match exec_id {
            None => Ok(&self.init),
            Some(e) => self
                .execs
                .get(e)
                .ok_or_else(|| Error::NotFound(format!("exec {e}"))),
        }
    }

    pub fn process_mut(&mut self, exec_id: Option<&str>) -> Result<&mut Process> {
        match exec_id {
            None => Ok(&mut self.init),
            Some(e) => self
                .execs
                .get_mut(e)
                .ok_or_else(|| Error::NotFound(format!("exec {e}"))),
        }
    }
}

/// Opens the process's streams in the guest and starts the FIFO relays. Called before the
/// create/exec call that claims the streams.
pub async fn wire_stdio(guest: &GuestLink, process: &ProcessRef, p: &StdioPaths) -> Result<Relays> {
    let open = |stream| {
        let hello = StdioHello {
            process: process.clone(),
            stream,
        };
        async move { guest.open_stdio(&hello).await }
    };
    let mut outputs = Outputs::default();
    let mut stdin = None;
    if !p.stdin.is_empty() {
        let s = open(StdioKind::Stdin).await?;
        let (tx, rx) = oneshot::channel();
        stdin = Some((tx, relay_stdin(p.stdin.clone(), s, rx)));
    }
    if !p.stdout.is_empty() {
        let s = open(StdioKind::Stdout).await?;
        outputs.relay(s, p.stdout.clone());
    }
    if !p.stderr.is_empty() && !p.terminal {
        let s = open(StdioKind::Stderr).await?;
        outputs.relay(s, p.stderr.clone());
    }
    Ok(Relays { outputs, stdin })
}
