//! The host side of Cocoon: containerd's Task API over a model of one pod.
//!
//! Rooms, from the wire inwards:
//! - [`service`]: the shim process (`start`, `delete` after a crash, the daemon, its socket).
//! - [`task`]: the Task RPC adapter; each RPC converts its request, calls [`pod::Pod`] and
//!   converts the answer ([`convert`]). It holds no state and no logic of its own.
//! - [`pod`]: the pod model: its VM, its containers and their processes, and the one lock that
//!   guards them. [`process`] holds what one process owns (stdio relays, exit watching).
//! - [`events`]: the typed events the pod publishes; the topic comes from the type.
//! - [`guest`]: the agent client and stdio dialer of a running guest.
//! - [`sandbox`]: one booted VM with a connected agent, behind the [`pod::VmFactory`] seam that
//!   the unit tests replace with a fake agent.
//! - [`rootfs`]: host-side rootfs mounts, behind the [`rootfs::Mounter`] seam.
//! - [`phase`]: the "phase …" log lines that `make bench` reads.

pub mod admin;
pub mod annotations;
pub mod child;
pub mod convert;
pub mod events;
pub mod forwarder;
pub mod guard;
pub mod guest;
pub mod hooks;
pub mod host_ns;
pub mod info;
pub mod io;
pub mod layers;
pub mod metrics;
pub mod network;
pub mod phase;
pub mod placement;
pub mod pod;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod shim_socket;
pub mod state;
pub mod task;
pub mod unmount;
pub mod volumes;

use std::time::Duration;

/// The one error type of this crate. [`convert::status`] maps each variant to the ttrpc status
/// code containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vmm(#[from] vmm_driver::Error),

    #[error("agent call {call} failed: {source}{}", tail(console_tail))]
    Agent {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
        console_tail: String,
    },

    /// The guest did not answer a call that should answer at once: it is frozen or stuck.
    #[error("agent call {call} for pod {pod} got no answer within {after:?}; the guest may be frozen or overloaded (agent.call_timeout_ms, agent.stdio_timeout_ms)")]
    Timeout {
        call: &'static str,
        pod: String,
        after: Duration,
    },

    #[error("the guest agent speaks API {agent}, this shim speaks {shim}: rebuild the guest image with `make image`")]
    ApiMismatch { agent: u32, shim: u32 },

    /// The cocoon config could not be read: nothing can boot until it is fixed.
    #[error("cocoon config: {0}")]
    Config(#[source] vmm_driver::Error),

    /// A VM that was asked for did not come up.
    #[error("booting the pod VM: {0}")]
    Boot(#[source] Box<Error>),

    #[error("{0} not found")]
    NotFound(String),

    #[error("{0} already exists")]
    AlreadyExists(String),

    #[error("the pod VM is not running")]
    NotRunning,

    /// The request itself is wrong (spec, annotations): retrying it won't help.
    #[error("{0}")]
    InvalidArgument(String),

    /// The pod's network namespace (from the sandbox spec) can't be used.
    #[error("network namespace {path}: {message}")]
    Netns {
        path: std::path::PathBuf,
        message: String,
    },

    /// A netlink step in the pod's network namespace failed; the message names the interface.
    #[error("pod network: {0}")]
    Network(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An agent call that failed on an established connection: the status the agent sent (or
    /// the broken connection) without a console tail, which only boot errors carry.
    pub fn agent(call: &'static str, source: ttrpc::Error) -> Error {
        Error::Agent {
            call,
            source,
            console_tail: String::new(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

fn tail(t: &str) -> String {
    if t.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of the console ---\n{}", t.trim_end())
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
