//! The shim process itself: `start` (group containers of a pod into one shim), `delete`
//! (clean up after a crash) and the daemon that serves the Task API.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

use crate::task::TaskService;

/// containerd CRI's annotations naming a container's pod.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Which pod (and so which shim and VM) a container belongs to: the CRI sandbox id for
/// containers of a pod, else the container's own id.
pub fn grouping_id(id: &str, spec: &serde_json::Value) -> String {
    let ann = &spec["annotations"];
    match (ann[CONTAINER_TYPE].as_str(), ann[SANDBOX_ID].as_str()) {
        (Some("container"), Some(sb)) if !sb.is_empty() => sb.to_owned(),
        _ => id.to_owned(),
    }
}

fn bundle_spec(bundle: &Path) -> serde_json::Value {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

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
}

/// The file behind a shim socket address (`unix:///run/containerd/s/<hash>`).
pub fn socket_file(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// Removes a shim socket that nothing listens on any more. The containerd-shim library only
/// removes it at exit if it finds an `address` file in its working directory, which this
/// shim's bundles don't have, and never after a crash.
pub fn remove_dead_socket(address: &str) {
    let path = socket_file(address);
    if address.is_empty() || !path.exists() {
        return;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return; // a live shim (another container of the pod) still serves it
    }
    match std::fs::remove_file(path) {
        Ok(()) => log::debug!("removed shim socket {}", path.display()),
        Err(e) => log::warn!("cannot remove shim socket {}: {e}", path.display()),
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
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let cwd = std::env::current_dir().unwrap_or_default();
        let grouping = grouping_id(&opts.id, &bundle_spec(&cwd));
        spawn(opts, &grouping, Vec::new()).await
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            self.bundle.clone().into()
        };
        let sandbox = grouping_id(&self.id, &bundle_spec(&bundle));
        // The shim of this pod died (or this is a late cleanup): its socket stays behind.
        remove_dead_socket(&containerd_shim::socket_address(
            &self.containerd_address,
            &self.namespace,
            &sandbox,
        ));
        match vmm_driver::Config::load() {
            Ok(cfg) => crate::state::cleanup(&cfg.state_dir.join(&sandbox)),
            Err(e) => log::warn!("delete: cannot read the cocoon config ({e}); nothing cleaned"),
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

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let sandbox = grouping_id(&self.id, &bundle_spec(Path::new(&self.bundle)));
        TaskService::new(
            sandbox,
            self.namespace.clone(),
            publisher,
            self.exit.clone(),
            self.socket.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_of_a_cri_pod_share_its_shim() {
        let c = json!({"annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}});
        assert_eq!(grouping_id("c1", &c), "pod1");
        let sb = json!({"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}});
        assert_eq!(grouping_id("pod1", &sb), "pod1");
        assert_eq!(grouping_id("solo", &json!({})), "solo");
    }
}
