//! Request and response bodies of Cloud Hypervisor's REST API, one type per schema, with only
//! the fields Cocoon sets or reads. Field names and types follow `cloud-hypervisor.yaml` of
//! CH v54; `ch-api-v54.json` beside this file is the subset the unit tests check them against.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /vm.create`. Options left `None` take Cloud Hypervisor's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<FsConfig>>,
}

/// Direct kernel boot: no firmware, so no BIOS time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    /// Above `boot_vcpus`, room for `vm.resize` to hot-add vCPUs.
    pub max_vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    /// Bytes that `vm.resize` may add later (ACPI hotplug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// virtio-fs needs guest memory that virtiofsd can map.
    #[serde(default)]
    pub shared: bool,
}

/// How a serial port or virtio console is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// The legacy 8250 port the kernel logs to (`console=ttyS0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SerialConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// For `Socket` mode: the path CH listens on for one reader of the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// The virtio console; Cocoon turns it off (CH's default would take over the shim's tty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
}

/// Same role as QEMU's `virtio-balloon-pci,free-page-reporting=on`: freed guest pages go back
/// to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Bytes the balloon starts inflated to.
    pub size: u64,
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// Hybrid vsock: CH itself proxies guest ports to `<socket>` and `<socket>_<port>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: PathBuf,
}

/// `vm.create`'s `fs` entries and `PUT /vm.add-fs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    pub num_queues: u32,
    pub queue_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl FsConfig {
    /// One request queue of 1024 entries, CH's defaults (both fields are required).
    pub fn new(tag: &str, socket: PathBuf) -> FsConfig {
        FsConfig {
            tag: tag.to_owned(),
            socket,
            num_queues: 1,
            queue_size: 1024,
            id: None,
        }
    }
}

/// `PUT /vm.resize`: any field left `None` keeps its size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmResize {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u32>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

/// `PUT /vm.add-net`: a tap device on the host (the pod netns's, for the networking work).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `PUT /vm.add-disk`: a block device backed by a host file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Answer of a hot-add: where the new device sits on the guest's PCI bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// `GET /vm.info`. `config` echoes the created config with CH's defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
}

/// `GET /vmm.ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    #[serde(default)]
    pub features: Vec<String>,
}
