//! The Cocoon agent API, generated from `proto/agent.proto`.
//!
//! Host and guest share this crate so both ends always agree on the wire format.

#![allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations,
    rust_2018_idioms,
    unsafe_code
)]

mod generated {
    include!(concat!(env!("OUT_DIR"), "/mod.rs"));
}

pub mod auth;
pub mod console;
pub mod dns;
pub mod forward;
pub mod process;

pub use generated::agent;
pub use generated::agent_ttrpc;

/// vsock port of the agent's ttrpc API.
pub const AGENT_PORT: u32 = 1024;
/// vsock port the agent accepts per-process stdio streams on.
pub const STDIO_PORT: u32 = 1025;
/// Host vsock port the agent connects to once it listens, so the host need not poll.
pub const READY_PORT: u32 = 1026;
/// vsock port the agent accepts port-forward connections on: a first line `<tcp port>\n`,
/// then the stream is a connection to 127.0.0.1:<tcp port> in the guest.
pub const FORWARD_PORT: u32 = 1027;
/// vsock port of the DNS relay (`dns.rs`): the host opens one stream per pod whose network
/// has Docker's embedded DNS (127.0.0.11 in the pod's netns on the host), and the agent
/// serves 127.0.0.11:53 in the guest through it.
pub const DNS_RELAY_PORT: u32 = 1028;
/// The name of the virtio-serial port that carries the agent's channel when the host chose it
/// over vsock: a yamux session whose streams each open with the vsock port they stand for
/// (four bytes, little-endian).
pub const SERIAL_PORT_NAME: &str = "io.cocoon.agent";
/// On the guest kernel's command line when the agent's channel is that virtio-serial port.
pub const SERIAL_CHANNEL_ARG: &str = "cocoon.channel=serial";
/// Where the agent mounts the virtio-fs share in the guest: the host's exported tree, with a
/// container's rootfs at `<GUEST_SHARE>/<id>/rootfs` and the pod's volumes at `_volumes/<n>`.
pub const GUEST_SHARE: &str = "/run/cocoon/shared";
/// Where the agent mounts a pod's guest-only tmpfs volumes (`CreateContainerRequest.ephemeral`).
pub const EPHEMERAL_DIR: &str = "/run/cocoon/ephemeral";
/// Where the agent keeps the files the host copies in (`PutFilesRequest`): one name per host
/// source, which the container specs bind.
pub const FILES_DIR: &str = "/run/cocoon/files";
/// Bumped on every incompatible change to `agent.proto`.
pub const API_VERSION: u32 = 9;
/// Kernel parameter that boots a guest as a VM template (`vmm-driver`'s `qemu/template.rs`):
/// no vsock or virtio-fs device yet, so the agent waits for them to be hot-plugged.
pub const TEMPLATE_PARAM: &str = "cocoon.template=1";
/// The line a template guest's agent writes on its console once it is ready to be saved.
pub const TEMPLATE_READY: &str = "cocoon-agent: template ready";

/// On the kernel command line of a VM whose agent serves `DebugExec` (`[debug] console =
/// true` on the host); without it the agent refuses the call.
pub const DEBUG_CONSOLE_PARAM: &str = "cocoon.debug_console=1";
/// The container id by which `DebugExec` processes are addressed in the calls that name a
/// process (wait, signal, resize, stdin): no container can have it (ids never start with '.').
pub const DEBUG_CONTAINER: &str = ".debug";

pub use dns::DnsFrame;
pub use process::{ProcessRef, StdioHello, StdioKind};
pub use protobuf;
pub use ttrpc;
