//! Kubernetes without a kubelet: a private containerd with its CRI plugin, the runtime handler
//! `cocoon`, Debian's CNI bridge + host-local plugins on a bridge and subnet only this test
//! uses, and a Rust CRI client (`k8s-cri` over tonic on the unix socket) that plays kubelet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::test_hypervisor;
use crate::containerd::{Containerd, IMAGE};

/// containerd's CRI namespace.
pub const NAMESPACE: &str = "k8s.io";
/// The pause image CRI starts each pod with, built locally like the test image.
pub const PAUSE_IMAGE: &str = "docker.io/library/cocoon-pause:latest";
/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const CNI_BIN: &str = "/usr/lib/cni";
/// The handler name RunPodSandbox asks for.
pub const HANDLER: &str = "cocoon";

/// The test's own CNI network: a bridge and a /24 no one else uses, named after this process
/// and numbered within it, so that two tests (or test binaries) never share them. The bridge plugin creates the bridge; dropping
/// this removes it.
#[derive(Debug)]
pub struct TestNet {
    pub bridge: String,
    pub subnet: String,
    pub gateway: String,
}

impl TestNet {
    pub fn new() -> TestNet {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let n = (pid + 37 * k) % 200 + 20;
        TestNet {
            bridge: format!("cct{pid}x{k}"),
            subnet: format!("10.231.{n}.0/24"),
            gateway: format!("10.231.{n}.1"),
        }
    }

    pub fn conflist(&self, ipam_dir: &Path) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "cocoon-test",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            }]
        })
        .to_string()
    }
}

impl Default for TestNet {
    fn default() -> Self {
        TestNet::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The CRI part of a private containerd's config, with the pause image `sandbox_image`.
pub fn cri_config(dir: &Path, sandbox_image: &str) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Lowering oom_score_adj is refused on these machines (kubelet gives the sandbox -998),
  # which runc can't do; CRI then keeps a container's score at containerd's own or above.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.gvisor]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.gvisor.options]
        BinaryName = "runsc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.cocoon.v2"
      pod_annotations = ["io.cocoon.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        conf = dir.join("cni").display()
    )
}

/// A private containerd with CRI, its test network and a connected CRI client.
#[derive(Debug)]
pub struct Cri {
    pub net: TestNet,
    pub containerd: Containerd,
    pub client: RuntimeServiceClient<Channel>,
}

/// What a container runs.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    pub name: &'a str,
    pub command: &'a [&'a str],
}

impl Cri {
    /// Starts containerd with CRI and the test network, imports the test and pause images and
    /// connects the client.
    pub async fn start() -> Cri {
        let net = TestNet::new();
        let conflist = |d: &Path| net.conflist(&d.join("ipam"));
        let containerd = Containerd::start_configured(test_hypervisor(), |d| {
            let cni = d.join("cni");
            std::fs::create_dir_all(&cni).unwrap();
            std::fs::write(cni.join("10-cocoon-test.conflist"), conflist(d)).unwrap();
            cri_config(d, PAUSE_IMAGE)
        });
        containerd.import_image(NAMESPACE, IMAGE, &["sh"]);
        containerd.import_image(NAMESPACE, PAUSE_IMAGE, &["sleep", "2147483647"]);
        let client = connect(&containerd.address).await;
        Cri {
            net,
            containerd,
            client,
        }
    }

    /// Where pods' CRI container logs go.
    pub fn log_dir(&self, pod: &str) -> PathBuf {
        self.containerd.dir.path().join("logs").join(pod)
    }

    /// The config kubelet would send for a pod named `name`.
    pub fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.log_dir(name).to_string_lossy().into_owned(),
            labels: HashMap::new(),
            annotations: HashMap::new(),
            // kubelet's defaults: the pod's network and IPC, a PID namespace per container
            // (set `pid` to POD for `shareProcessNamespace: true`).
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod.into(),
                        pid: cri::NamespaceMode::Container.into(),
                        ipc: cri::NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with `handler`; returns the pod id and the config, for its containers.
    pub async fn run_pod(&mut self, name: &str, handler: &str) -> (String, cri::PodSandboxConfig) {
        let config = self.pod_config(name);
        self.run_pod_with(config, handler).await
    }

    /// RunPodSandbox of `config` with `handler`.
    pub async fn run_pod_with(
        &mut self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> (String, cri::PodSandboxConfig) {
        match self.try_run_pod_with(config, handler).await {
            Ok(v) => v,
            Err(e) => panic!("{e}\ncontainerd log:\n{}", self.containerd.log()),
        }
    }

    /// [`Cri::run_pod`] that returns the error instead of failing the test.
    pub async fn try_run_pod(
        &mut self,
        name: &str,
        handler: &str,
    ) -> Result<(String, cri::PodSandboxConfig), String> {
        let config = self.pod_config(name);
        self.try_run_pod_with(config, handler).await
    }

    pub async fn try_run_pod_with(
        &mut self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<(String, cri::PodSandboxConfig), String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        std::fs::create_dir_all(self.log_dir(&name)).unwrap();
        let r = self
            .client
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map_err(|e| format!("RunPodSandbox {name} ({handler}): {e}"))?;
        Ok((r.into_inner().pod_sandbox_id, config))
    }

    /// CreateContainer + StartContainer; returns the container id.
    pub async fn start_container(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        c: ContainerSpec<'_>,
    ) -> String {
        match self.try_start_container(pod, pod_config, c).await {
            Ok(id) => id,
            Err(e) => panic!("{e}\ncontainerd log:\n{}", self.containerd.log()),
        }
    }

    /// [`Cri::start_container`] that returns the error instead of failing the test.
    pub async fn try_start_container(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        c: ContainerSpec<'_>,
    ) -> Result<String, String> {
        self.try_start_container_with(pod, pod_config, c, vec![], None)
            .await
    }

    /// [`Cri::try_start_container`] with kubelet-style volume mounts (host paths) and the
    /// container's resources.
    pub async fn try_start_container_with(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        c: ContainerSpec<'_>,
        mounts: Vec<cri::Mount>,
        resources: Option<cri::LinuxContainerResources>,
    ) -> Result<String, String> {
        let config = cri::ContainerConfig {
            mounts,
            metadata: Some(cri::ContainerMetadata {
                name: c.name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: c.command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{}.log", c.name),
            // As kubelet does, the container's namespaces follow the pod's.
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: pod_config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                resources,
            }),
            ..Default::default()
        };
        let created = self
            .client
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await;
        let id = created
            .map_err(|e| format!("CreateContainer {}: {e}", c.name))?
            .into_inner()
            .container_id;
        self.client
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|e| format!("StartContainer {}: {e}", c.name))?;
        Ok(id)
    }

    /// ExecSync: exit code, stdout, stderr.
    pub async fn exec_sync(&mut self, container: &str, cmd: &[&str]) -> (i32, String, String) {
        let r = self
            .client
            .exec_sync(cri::ExecSyncRequest {
                container_id: container.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
            .into_inner();
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    /// The pod's IP as CRI reports it (from CNI).
    pub async fn pod_ip(&mut self, pod: &str) -> String {
        let s = self
            .client
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        s.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default()
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet does when a pod is deleted; both must
    /// succeed.
    pub async fn stop_and_remove_pod(&mut self, pod: &str) {
        let stop = self
            .client
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        assert!(
            stop.is_ok(),
            "StopPodSandbox: {stop:?}\ncontainerd log:\n{}",
            self.containerd.log()
        );
        let rm = self
            .client
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        assert!(
            rm.is_ok(),
            "RemovePodSandbox: {rm:?}\ncontainerd log:\n{}",
            self.containerd.log()
        );
    }
}

/// A CRI client on containerd's unix socket.
pub async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_owned();
    // The URI is required by tonic and ignored by the connector.
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .expect("connect to containerd's CRI socket");
    RuntimeServiceClient::new(channel)
}
