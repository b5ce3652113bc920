//! The one error type of this crate. Every message names the thing that went wrong and, where
//! there is one, the command that fixes it.

use std::path::PathBuf;
use std::time::Duration;

/// Errors from configuring, starting, reaching and stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config file {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("invalid config value `{key}`: {message}")]
    ConfigValue { key: &'static str, message: String },

    #[error("{what} not found at {path}: run `make image` to build and install the guest image")]
    ImageMissing { what: &'static str, path: PathBuf },

    #[error("{name} is not installed (looked for `{path}`): run `make setup`, or set `paths.{key}` in the config")]
    BinaryMissing {
        name: &'static str,
        key: &'static str,
        path: PathBuf,
    },

    #[error("accel = \"kvm\" was asked for, but KVM is not usable here: {reason}; use accel = \"auto\" or \"tcg\"")]
    KvmUnusable { reason: String },

    #[error("{what} is not supported with {hypervisor} yet; use hypervisor = \"qemu\"")]
    Unsupported {
        what: &'static str,
        hypervisor: &'static str,
    },
    #[error("{name} can't run on this host: {reason}; use hypervisor = \"qemu\", which falls back to TCG")]
    HypervisorUnusable { name: &'static str, reason: String },

    #[error("cloud-hypervisor API {endpoint} failed (HTTP {status}): {message}")]
    ChApi {
        endpoint: &'static str,
        status: u16,
        message: String,
    },

    #[error("cloud-hypervisor API {endpoint}: {message}")]
    ChTransport {
        endpoint: &'static str,
        message: String,
    },

    #[error("could not start {name}: {source}")]
    Spawn {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{name} did not create its socket {socket} within {waited:?}{}",
        tail_suffix(log_tail)
    )]
    DaemonNotReady {
        name: &'static str,
        socket: PathBuf,
        waited: Duration,
        log_tail: String,
    },

    #[error("{name} exited early ({status}){}", tail_suffix(log_tail))]
    DaemonExited {
        name: &'static str,
        status: String,
        log_tail: String,
    },

    #[error("QMP: {0}")]
    Qmp(String),

    /// A host directory asked of a pod VM that can't take the virtio-fs share (`late_share.rs`).
    #[error("{0}")]
    ShareRefused(String),

    /// A VM template could not be made or restored; the launch falls back to a cold boot.
    #[error("VM template: {0}")]
    Template(String),

    #[error(
        "the VM exited before its agent answered ({status}){}",
        tail_suffix(console_tail)
    )]
    VmExited {
        status: String,
        console_tail: String,
    },

    #[error("the guest agent did not answer within {waited:?} (is the image current? run `make image`){}", tail_suffix(console_tail))]
    AgentUnreachable {
        waited: Duration,
        console_tail: String,
    },

    /// A call on the VMM or a helper that got no answer in its bound (`vmm.api_timeout_ms`):
    /// the process is alive but stuck (stopped, or its guest is frozen).
    #[error("{call} got no answer within {after:?}")]
    Timeout { call: String, after: Duration },

    #[error("hybrid vsock handshake: {0}")]
    Handshake(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of the log ---\n{}", tail.trim_end())
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
