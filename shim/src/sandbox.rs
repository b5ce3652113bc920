//! A sandbox is one VM with a connected agent. Booting is all-or-nothing: if any step fails,
//! the VM and its helpers are stopped before the error is returned.

use std::time::{Duration, Instant};

use cocoon_protocol::agent::{
    CheckRequest, GuestDetailsRequest, GuestDetailsResponse, ShutdownRequest,
};
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::{AGENT_PORT, API_VERSION, READY_PORT, STDIO_PORT};
use tokio::io::AsyncWriteExt;
use ttrpc::context;
use ttrpc::r#async::transport::Socket;
use ttrpc::r#async::Client;
use vmm_driver::vsock::BoxedStream;
use vmm_driver::{Config, VmSpec, Vmm};

use crate::{Error, Result};

/// Per-call deadline for agent calls that should answer at once.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest may take to power off after Shutdown before it is stopped forcibly.
const POWEROFF_GRACE: Duration = Duration::from_secs(5);

/// One of a process's stdio streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioKind {
    Stdin,
    Stdout,
    /// Unused for terminal processes: the pty merges it into stdout.
    Stderr,
}

impl StdioKind {
    fn name(self) -> &'static str {
        match self {
            StdioKind::Stdin => "stdin",
            StdioKind::Stdout => "stdout",
            StdioKind::Stderr => "stderr",
        }
    }
}

/// Where boot time went, measured on the host from the start of [`Sandbox::boot`].
#[derive(Debug, Clone, Copy)]
pub struct BootTimings {
    /// Helpers and VMM running, QMP answering.
    pub vmm_started: Duration,
    /// The agent's vsock port accepted a connection.
    pub agent_connected: Duration,
    /// The agent answered its first call.
    pub agent_ready: Duration,
}

/// A cheap, cloneable view of a running sandbox: its agent client, where its vsock is and its
/// shared dir. Lets the shim talk to the guest without holding its pod lock.
#[derive(Clone)]
pub struct SandboxHandle {
    pub agent: AgentServiceClient,
    endpoint: vmm_driver::vsock::VsockEndpoint,
    pub shared_dir: std::path::PathBuf,
}

impl std::fmt::Debug for SandboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxHandle")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl SandboxHandle {
    /// See [`Sandbox::open_stdio`].
    pub async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: StdioKind,
    ) -> Result<BoxedStream> {
        let mut s = vmm_driver::vsock::connect_once(&self.endpoint, STDIO_PORT).await?;
        let eid = if exec_id.is_empty() { "-" } else { exec_id };
        let hello = format!("{container_id} {eid} {}\n", stream.name());
        s.write_all(hello.as_bytes()).await.map_err(|e| {
            Error::Vmm(vmm_driver::Error::Io {
                context: "send the stdio hello".into(),
                source: e,
            })
        })?;
        Ok(s)
    }
}

/// A running pod VM and its agent.
pub struct Sandbox {
    pub id: String,
    shared_dir: std::path::PathBuf,
    vm: Box<dyn Vmm>,
    agent: AgentServiceClient,
    pub timings: BootTimings,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

fn ctx() -> context::Context {
    context::with_duration(CALL_TIMEOUT)
}

impl Sandbox {
    /// Boots the VM and waits until its agent answers.
    pub async fn boot(cfg: &Config, spec: &VmSpec) -> Result<Sandbox> {
        let t0 = Instant::now();
        let mut vm = vmm_driver::launch(cfg, spec).await?;
        let vmm_started = t0.elapsed();
        match Self::connect(cfg, vm.as_mut(), t0).await {
            Ok((agent, agent_connected)) => {
                let timings = BootTimings {
                    vmm_started,
                    agent_connected,
                    agent_ready: t0.elapsed(),
                };
                log::info!(
                    "sandbox {}: agent ready after {:?} ({timings:?})",
                    spec.id,
                    timings.agent_ready
                );
                Ok(Sandbox {
                    id: spec.id.clone(),
                    shared_dir: spec.run_dir.join("shared"),
                    vm,
                    agent,
                    timings,
                })
            }
            Err(e) => {
                if let Err(stop) = vm.stop().await {
                    log::warn!("sandbox {}: cleanup after failed boot: {stop}", spec.id);
                }
                Err(e)
            }
        }
    }

    async fn connect(
        cfg: &Config,
        vm: &mut dyn Vmm,
        t0: Instant,
    ) -> Result<(AgentServiceClient, Duration)> {
        let timeout =
            Duration::from_millis(cfg.agent.connect_timeout_ms).saturating_sub(t0.elapsed());
        let stream = vmm_driver::connect_guest(vm, AGENT_PORT, Some(READY_PORT), timeout).await?;
        let connected = t0.elapsed();
        let agent = AgentServiceClient::new(Client::new(Socket::new(stream)));
        let check = agent
            .check(ctx(), &CheckRequest::new())
            .await
            .map_err(|source| Error::Agent {
                call: "Check",
                source,
                console_tail: vmm_driver::tail_lines(&vm.console_log(), 20),
            })?;
        if check.api_version != API_VERSION {
            return Err(Error::ApiMismatch {
                agent: check.api_version,
                shim: API_VERSION,
            });
        }
        Ok((agent, connected))
    }

    /// Why the VM is gone, if its VMM exited (crash, kill, guest poweroff).
    pub fn vm_exit(&mut self) -> Option<String> {
        self.vm.exit_error().map(|e| e.to_string())
    }

    /// The generated agent client, for calls this type does not wrap.
    pub fn agent(&self) -> &AgentServiceClient {
        &self.agent
    }

    /// The VM underneath, e.g. to list its processes.
    pub fn vm(&self) -> &dyn Vmm {
        self.vm.as_ref()
    }

    /// The sandbox's runtime directory (`<state_dir>/<id>`).
    pub fn run_dir(&self) -> std::path::PathBuf {
        self.shared_dir
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default()
    }

    /// The host directory the guest sees at `/run/cocoon/shared` (virtio-fs).
    pub fn shared_dir(&self) -> &std::path::Path {
        &self.shared_dir
    }

    /// Opens one stdio stream of a process, to be claimed by the CreateContainer or
    /// ExecProcess call that follows. `exec_id` empty means the container's init.
    pub async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        stream: StdioKind,
    ) -> Result<BoxedStream> {
        self.handle()
            .open_stdio(container_id, exec_id, stream)
            .await
    }

    /// What callers need to talk to the guest without holding on to the sandbox itself.
    pub fn handle(&self) -> SandboxHandle {
        SandboxHandle {
            agent: self.agent.clone(),
            endpoint: self.vm.agent_endpoint().clone(),
            shared_dir: self.shared_dir.clone(),
        }
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse> {
        self.agent
            .guest_details(ctx(), &GuestDetailsRequest::new())
            .await
            .map_err(|source| self.agent_error("GuestDetails", source))
    }

    fn agent_error(&self, call: &'static str, source: ttrpc::Error) -> Error {
        Error::Agent {
            call,
            source,
            console_tail: vmm_driver::tail_lines(&self.vm.console_log(), 20),
        }
    }

    /// Asks the guest to power off, then stops and reaps everything, even if the guest did not
    /// cooperate. The sandbox is gone afterwards in every case.
    pub async fn shutdown(mut self) -> Result<()> {
        let asked = self
            .agent
            .shutdown(
                context::with_duration(Duration::from_secs(2)),
                &ShutdownRequest::new(),
            )
            .await;
        if let Err(e) = &asked {
            log::warn!(
                "sandbox {}: Shutdown call failed ({e}); stopping the VM",
                self.id
            );
        }
        let clean = asked.is_ok() && self.vm.wait_exit(POWEROFF_GRACE).await;
        self.vm.stop().await?;
        if asked.is_ok() && !clean {
            return Err(Error::ShutdownTimeout(POWEROFF_GRACE));
        }
        Ok(())
    }
}
