//! The host side of Cocoon: a pod's VM plus the agent client that drives it.
//!
//! The containerd Task service ([`task::TaskService`]) sits on top of [`sandbox::Sandbox`].

pub mod annotations;
pub mod io;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod task;

use std::time::Duration;

/// The one error type of this crate.
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

    #[error("the guest agent speaks API {agent}, this shim speaks {shim}: rebuild the guest image with `make image`")]
    ApiMismatch { agent: u32, shim: u32 },

    #[error("the VM did not power off within {0:?} after Shutdown; it was stopped forcibly")]
    ShutdownTimeout(Duration),
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
