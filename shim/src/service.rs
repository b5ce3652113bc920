//! The shim process itself: `start` (group containers of a pod into one shim), `delete`
//! (clean up after a crash) and the daemon that serves the Task API.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

use crate::admin::AdminServer;
use crate::annotations::{bundle_spec, grouping_id};
use crate::events::RemoteSink;
use crate::forwarder::Forwarder;
use crate::guard::Guard;
use crate::pod::Pod;
use crate::rootfs::HostMounter;
use crate::sandbox::SandboxFactory;
use crate::shim_socket::{remove_dead_socket, socket_file};
use crate::task::TaskService;

/// The shim.
#[derive(Clone)]
pub struct CocoonShim {
    id: String,
    namespace: String,
    bundle: String,
    /// The ttrpc socket this shim serves on (`-socket`), removed when it shuts down.
    socket: String,
    /// containerd's own socket (`-address`), from which shim socket names derive.
    containerd_address: String,
    exit: Arc<ExitSignal>,
    /// The pod's events to containerd, flushed before the shim exits.
    forwarder: Arc<std::sync::OnceLock<Forwarder>>,
    /// The pod's guard (`guard.rs`), released once the pod is down.
    guard: Arc<std::sync::Mutex<Option<Guard>>>,
    /// The pod's admin endpoint (`admin.rs`), removed when the shim exits.
    admin: Arc<std::sync::Mutex<Option<AdminServer>>>,
}

/// How long an exiting shim waits for containerd to take the events it still holds.
const FLUSH_ON_EXIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The runtime directory of pod `sandbox`, from the cocoon config.
fn run_dir_of(sandbox: &str) -> Result<std::path::PathBuf, vmm_driver::error::Error> {
    vmm_driver::Config::load().map(|cfg| cfg.state_dir.join(sandbox))
}

/// What a dead shim of pod `sandbox` left: its VM's processes, mounts and runtime directory,
/// and its admin endpoint.
fn cleanup_sandbox(sandbox: &str) {
    match run_dir_of(sandbox) {
        Ok(run_dir) => crate::state::cleanup(&run_dir),
        Err(e) => log::warn!("delete: cannot read the cocoon config ({e}); nothing cleaned"),
    }
}

impl std::fmt::Debug for CocoonShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CocoonShim")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Shim for CocoonShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        CocoonShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
            socket: args.socket.clone(),
            containerd_address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
            forwarder: Arc::default(),
            guard: Arc::default(),
            admin: Arc::default(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let cwd = std::env::current_dir().unwrap_or_default();
        let grouping = grouping_id(&opts.id, &bundle_spec(&cwd));
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd 1.6 and 1.7 find a running task's shim after they restart by this file in
        // the bundle (2.x by its own bootstrap.json, and by this one for shims started under
        // 1.x); without it they take the shim for dead and its pod is orphaned. The library
        // writes it only when the socket already existed.
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            self.bundle.clone().into()
        };
        let sandbox = grouping_id(&self.id, &bundle_spec(&bundle));
        let address =
            containerd_shim::socket_address(&self.containerd_address, &self.namespace, &sandbox);
        // containerd runs `delete` whenever its connection for a task closes, also when it
        // closed it itself after deleting one container of a pod whose shim lives on: then the
        // pod is not this call's to clean up.
        if remove_dead_socket(&address) {
            log::info!(
                "delete {}: the shim of pod {sandbox} still serves; nothing to clean",
                self.id
            );
        } else {
            // The shim of this pod died (or this is a late cleanup): clean up what it left.
            cleanup_sandbox(&sandbox);
        }
        let mut ts =
            containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::new();
        ts.seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: MessageField::some(ts),
            ..Default::default()
        })
    }

    /// Returns once the Task service's Shutdown let the shim go. The socket is unlinked here:
    /// the connection serving that call stays up, and nothing new may connect to a shim that is
    /// going away.
    async fn wait(&mut self) {
        self.exit.wait().await;
        if let Some(f) = self.forwarder.get() {
            f.flush(FLUSH_ON_EXIT).await;
        }
        let guard = self.guard.lock().ok().and_then(|mut g| g.take());
        if let Some(g) = guard {
            g.release().await;
        }
        if let Err(e) = std::fs::remove_file(socket_file(&self.socket)) {
            log::debug!("removing {}: {e}", self.socket);
        }
        drop(self.admin.lock().ok().and_then(|mut a| a.take()));
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let sandbox = grouping_id(&self.id, &bundle_spec(Path::new(&self.bundle)));
        self.start_guard(&sandbox);
        let pod = Pod::new(
            sandbox,
            Box::new(SandboxFactory),
            Box::new(HostMounter),
            Box::new(RemoteSink::new(
                self.forwarder
                    .get_or_init(|| Forwarder::spawn(&publisher.address))
                    .clone(),
                self.namespace.clone(),
            )),
        );
        on_stop_signal(pod.clone(), self.exit.clone());
        self.start_admin(&pod);
        TaskService::new(pod, self.exit.clone())
    }
}

impl CocoonShim {
    /// Serves the pod's admin endpoint; a shim without one still runs its pod.
    fn start_admin(&self, pod: &Pod) {
        let cfg = match vmm_driver::Config::load() {
            Ok(cfg) => cfg,
            Err(e) => {
                log::warn!("no admin endpoint for pod {}: {e}", pod.id());
                return;
            }
        };
        let path = crate::state::admin_socket(&cfg.state_dir.join(pod.id()));
        let admin =
            AdminServer::start(pod.clone(), self.namespace.clone(), path, cfg.debug.console);
        match admin {
            Ok(a) => {
                if let Ok(mut slot) = self.admin.lock() {
                    *slot = Some(a);
                }
            }
            Err(e) => log::warn!("no admin endpoint for pod {}: {e}", pod.id()),
        }
    }

    /// Starts the pod's guard before anything of the pod exists, so that a shim killed even
    /// in the middle of a boot leaves nothing behind.
    fn start_guard(&self, sandbox: &str) {
        let run_dir = match run_dir_of(sandbox) {
            Ok(run_dir) => run_dir,
            Err(e) => {
                log::warn!("no guard for pod {sandbox}: cannot read the cocoon config ({e})");
                return;
            }
        };
        match Guard::start(&run_dir, &self.socket) {
            Ok(g) => {
                if let Ok(mut slot) = self.guard.lock() {
                    *slot = Some(g);
                }
            }
            Err(e) => log::warn!("no guard for pod {sandbox}: {e}"),
        }
    }
}

/// SIGTERM or SIGINT tears the pod down and lets the shim exit (0). The containerd-shim
/// library only logs these, which would leave a shim that can only be SIGKILLed, and its VM
/// with it.
fn on_stop_signal(pod: Pod, exit: Arc<ExitSignal>) {
    use tokio::signal::unix::{signal, SignalKind};
    let watched =
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
    let (mut term, mut int) = match watched {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot watch for SIGTERM and SIGINT: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        log::info!("{name}: tearing pod {} down", pod.id());
        pod.terminate().await;
        exit.signal();
    });
}
