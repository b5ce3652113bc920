//! Runtime configuration: `/etc/cocoon/config.toml`, or the file named by `COCOON_CONFIG`.
//!
//! Unknown keys are errors rather than warnings: a typo in a security-relevant setting must not
//! silently fall back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the config is read from when `COCOON_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cocoon/config.toml";
/// Where `make image` installs the guest kernel, initramfs and manifest.
pub const DEFAULT_IMAGE_DIR: &str = "/usr/local/share/cocoon";

/// The hypervisor that runs pod VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    Qemu,
    CloudHypervisor,
}

/// CPU virtualisation: `auto` uses KVM only where a real kvm_intel/kvm_amd is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// How the host reaches the guest's vsock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VsockMode {
    /// Kernel vsock where `/dev/vhost-vsock` exists; elsewhere the serial channel with QEMU
    /// (no vhost-user daemon, so pods can share the template's RAM) and hybrid vsock with
    /// Cloud Hypervisor.
    Auto,
    /// A unix socket speaking `CONNECT <port>` (vhost-device-vsock, Cloud Hypervisor).
    Hybrid,
    /// AF_VSOCK through the host kernel's vhost-vsock.
    Kernel,
    /// Not vsock: the agent's channel is a virtio-serial port carrying a yamux session
    /// (`serial.rs`), QEMU's own device, so no vhost-user daemon maps the guest's RAM
    /// (QEMU only).
    Serial,
}

/// virtiofsd's cache policy for the shared directory (its `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtiofsCache {
    /// Every lookup and read goes to the host: always current, slowest.
    Never,
    /// Metadata cached, file data not.
    Metadata,
    /// Metadata and data cached briefly and revalidated (virtiofsd's and Kata's default).
    Auto,
    /// Cached until the guest drops it: only for shares nothing on the host changes.
    Always,
}

impl VirtiofsCache {
    pub fn as_arg(self) -> &'static str {
        match self {
            VirtiofsCache::Never => "never",
            VirtiofsCache::Metadata => "metadata",
            VirtiofsCache::Auto => "auto",
            VirtiofsCache::Always => "always",
        }
    }
}

/// Whether pod VMs start from a VM template (`qemu/template.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateMode {
    /// Restore from a saved, booted guest where the backend and the host allow it (QEMU with
    /// hybrid vsock); boot the kernel otherwise, or when the template fails.
    Auto,
    /// Always boot the kernel.
    Off,
}

/// When a pod VM gets its virtio-fs share and virtiofsd (issue #29).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShareMode {
    /// When a container needs it: from the start if the first one does, plugged in later if
    /// a later one does, never for a pod that binds no host directory.
    OnDemand,
    /// From the start, in every pod (a handler whose pods mostly gain host directories late).
    Always,
}

/// How virtiofsd confines itself (its `--sandbox`). There is deliberately no `none`: the guest
/// can send virtiofsd raw FUSE requests, and without a sandbox an absolute name in one acts on
/// the host's `/` (Kata's GHSA-2gv2-cffp-j227).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtiofsdSandbox {
    /// pivot_root into the share inside new mount, pid and network namespaces (the default).
    Namespace,
    /// chroot into the share: for hosts where namespaces can't be created.
    Chroot,
}

impl VirtiofsdSandbox {
    pub fn as_arg(self) -> &'static str {
        match self {
            VirtiofsdSandbox::Namespace => "namespace",
            VirtiofsdSandbox::Chroot => "chroot",
        }
    }
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: Hypervisor,
    pub accel: Accel,
    pub vsock: VsockMode,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs with cocoon-agent as /init.
    pub initramfs: PathBuf,
    /// Appended to the kernel command line Cocoon builds.
    pub kernel_params: String,
    /// Per-sandbox runtime state: sockets, shared dir, console log.
    pub state_dir: PathBuf,
    /// Guest agent log level: error, warn, info, debug, trace.
    pub log_level: String,
    /// Keep the kernel's boot messages on the console (drops `quiet`).
    pub debug_console: bool,
    /// The guest agent's console lines at this level or more severe also go to the shim's log
    /// (containerd's): off, error, warn, info, debug, trace. The agent logs at `log_level`.
    pub agent_log_in_shim: String,
    /// How the guest caches the shared directory (container rootfs).
    pub virtiofs_cache: VirtiofsCache,
    /// How virtiofsd is confined; never unconfined.
    pub virtiofsd_sandbox: VirtiofsdSandbox,
    /// Where VM templates are kept (root only): one saved guest per kernel, initramfs, QEMU
    /// and VM shape.
    pub template_dir: PathBuf,
    pub vm: VmDefaults,
    pub rootfs: RootfsSettings,
    pub agent: AgentSettings,
    pub vmm: VmmSettings,
    pub paths: BinaryPaths,
    pub debug: DebugSettings,
}

/// What an operator may do inside a pod's VM (`cocoon exec`, issue #31).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DebugSettings {
    /// `cocoon exec`: commands in the guest VM, outside every container, as root of the
    /// guest. Off by default: it reaches every container of the pod. Pods booted with it
    /// have a shell (busybox) in the guest; the agent refuses the call in a VM booted without.
    pub console: bool,
}

/// How a container's image reaches the guest (issue #29).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootfsMode {
    /// Each image layer as a read-only EROFS disk, the writable layer in the guest, wherever
    /// the rootfs is an overlay of layers and the VMM can add disks; the share otherwise.
    Layers,
    /// Always the host's rootfs mount over virtio-fs.
    VirtioFs,
}

/// Where a layered container's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpperMode {
    /// A sparse scratch disk of the container's own, made on the host and read only by the
    /// guest; gone with the container.
    Disk,
    /// A tmpfs in the guest, bounded by the VM's memory.
    Memory,
}

/// Container root filesystems.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RootfsSettings {
    pub mode: RootfsMode,
    /// Where layer images are kept (root only), reused by every pod of the host.
    pub layer_cache_dir: PathBuf,
    pub upper: UpperMode,
    /// Bound of a container's writable layer, in MiB: the scratch disk's size, or the tmpfs's;
    /// 0: 10 GiB for a disk, half the VM's memory for a tmpfs.
    pub upper_size_mib: u64,
    /// Where scratch disks are made: files without a name (`O_TMPFILE`), gone when the VM lets
    /// go of them, whatever happens to the shim.
    pub scratch_dir: PathBuf,
}

impl Default for RootfsSettings {
    fn default() -> Self {
        RootfsSettings {
            mode: RootfsMode::Layers,
            layer_cache_dir: PathBuf::from("/var/lib/cocoon/layers"),
            upper: UpperMode::Disk,
            upper_size_mib: 0,
            scratch_dir: PathBuf::from("/var/lib/cocoon/scratch"),
        }
    }
}

/// VM sizing defaults and the bounds that pod annotations may not exceed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmDefaults {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Whether pods may size their VM with `io.cocoon.vm.*` annotations (within the maxima).
    /// A pod author is not trusted: an operator can take the choice away.
    pub annotations: bool,
    /// Start pods from a VM template instead of booting a kernel.
    pub template: TemplateMode,
    /// When a pod gets the virtio-fs share.
    pub share: ShareMode,
    /// Whether a pod restored from the template may map the template's RAM copy-on-write
    /// instead of holding a copy of its own (`qemu/restore.rs`).
    pub clone_ram: CloneRam,
}

/// How a pod restored from the VM template holds its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneRam {
    /// Copy-on-write from the template's RAM file wherever the pod can't need shared RAM: no
    /// vhost-user device (the agent's channel is `serial`, no virtio-fs share) and no later
    /// containers that could bring one (a CRI pod sandbox keeps a copy of its own), on a QEMU
    /// that can map a file it opened read-only (8.2 on).
    Auto,
    /// Every pod holds its own copy (shared memory, as vhost-user needs).
    Off,
}

/// How long the host waits for the agent. A hung or frozen guest must cost a caller an error
/// that names the call, never a wait without end (issue #15).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// From VMM start until the agent must answer its first call; also how long a VM
    /// template's guest may take to get ready while the template is made.
    pub connect_timeout_ms: u64,
    /// One agent call, from the moment it is queued on the connection to its reply (calls that
    /// wait for the guest by design, a process's exit or the next OOM event, are not bounded).
    pub call_timeout_ms: u64,
    /// Opening one stdio stream of a process (vsock connect, handshake, hello).
    pub stdio_timeout_ms: u64,
}

/// How long the host waits for the VMM itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmmSettings {
    /// One QMP exchange (the greeting and capabilities handshake, each command) or one Cloud
    /// Hypervisor API call.
    pub api_timeout_ms: u64,
}

/// Cocoon's own QEMU, where `make setup` unpacks it (`scripts/fetch-qemu.sh`): Debian 12's
/// QEMU 7.2 can't map a read-only file as private guest RAM, which clones of the VM template
/// need (`qemu/version.rs`), and bookworm-backports' 10.0 can.
pub const COCOON_QEMU: &str = "/usr/local/lib/cocoon/qemu/usr/bin/qemu-system-x86_64";

/// Cocoon's own QEMU where it is installed, else `qemu-system-x86_64` on PATH.
pub fn default_qemu() -> PathBuf {
    if Path::new(COCOON_QEMU).exists() {
        COCOON_QEMU.into()
    } else {
        "qemu-system-x86_64".into()
    }
}

/// Helper binaries. A bare name is looked up on PATH (and in /usr/local/bin, /usr/libexec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BinaryPaths {
    pub qemu: PathBuf,
    pub cloud_hypervisor: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_device_vsock: PathBuf,
    /// erofs-utils' `mkfs.erofs`, which builds the layer images.
    pub mkfs_erofs: PathBuf,
    /// e2fsprogs' `mkfs.ext4`, which formats scratch disks.
    pub mkfs_ext4: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hypervisor: Hypervisor::Qemu,
            accel: Accel::Auto,
            vsock: VsockMode::Auto,
            kernel: Path::new(DEFAULT_IMAGE_DIR).join("vmlinuz"),
            initramfs: Path::new(DEFAULT_IMAGE_DIR).join("initramfs.img"),
            kernel_params: String::new(),
            state_dir: PathBuf::from("/run/cocoon"),
            log_level: "info".into(),
            debug_console: false,
            agent_log_in_shim: "warn".into(),
            virtiofs_cache: VirtiofsCache::Auto,
            virtiofsd_sandbox: VirtiofsdSandbox::Namespace,
            template_dir: PathBuf::from("/var/lib/cocoon/templates"),
            vm: VmDefaults::default(),
            rootfs: RootfsSettings::default(),
            agent: AgentSettings::default(),
            vmm: VmmSettings::default(),
            paths: BinaryPaths::default(),
            debug: DebugSettings::default(),
        }
    }
}

impl Default for VmDefaults {
    fn default() -> Self {
        VmDefaults {
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 4,
            max_memory_mib: 4096,
            annotations: true,
            template: TemplateMode::Auto,
            share: ShareMode::OnDemand,
            clone_ram: CloneRam::Auto,
        }
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        // TCG boots take ~2 s on a quiet machine; leave room for a loaded one.
        // Calls answer in milliseconds on a healthy guest; 30 s leaves room for a guest
        // under heavy load before a caller is told it hangs.
        AgentSettings {
            connect_timeout_ms: 30_000,
            call_timeout_ms: 30_000,
            stdio_timeout_ms: 10_000,
        }
    }
}

impl Default for VmmSettings {
    fn default() -> Self {
        VmmSettings {
            api_timeout_ms: 10_000,
        }
    }
}

impl AgentSettings {
    pub fn call_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.call_timeout_ms)
    }

    pub fn stdio_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.stdio_timeout_ms)
    }
}

impl VmmSettings {
    pub fn api_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.api_timeout_ms)
    }
}

impl Default for BinaryPaths {
    fn default() -> Self {
        BinaryPaths {
            qemu: default_qemu(),
            cloud_hypervisor: "cloud-hypervisor".into(),
            virtiofsd: "virtiofsd".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
            mkfs_erofs: "mkfs.erofs".into(),
            mkfs_ext4: "mkfs.ext4".into(),
        }
    }
}

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// Below this the Debian kernel plus agent cannot boot reliably.
pub const MIN_MEMORY_MIB: u32 = 64;

impl Config {
    /// [`Config::agent_log_in_shim`] as a filter (validated at load; `warn` if not).
    pub fn agent_log_filter(&self) -> log::LevelFilter {
        self.agent_log_in_shim
            .parse()
            .unwrap_or(log::LevelFilter::Warn)
    }

    /// Reads `COCOON_CONFIG`, else `/etc/cocoon/config.toml`; a missing default file means defaults.
    pub fn load() -> Result<Config> {
        match std::env::var_os("COCOON_CONFIG") {
            Some(p) => Config::from_file(Path::new(&p)),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_owned(),
            message: format!("cannot read it: {e}"),
        })?;
        Config::parse(&text).map_err(|e| match e {
            Error::Config { message, .. } => Error::Config {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the types alone cannot.
    pub fn validate(&self) -> Result<()> {
        let vm = &self.vm;
        if vm.max_vcpus == 0 {
            return Err(value("vm.max_vcpus", "must be at least 1"));
        }
        if vm.vcpus == 0 || vm.vcpus > vm.max_vcpus {
            return Err(value(
                "vm.vcpus",
                &format!(
                    "{} is out of range; use 1..={} (vm.max_vcpus)",
                    vm.vcpus, vm.max_vcpus
                ),
            ));
        }
        if vm.max_memory_mib < MIN_MEMORY_MIB {
            return Err(value(
                "vm.max_memory_mib",
                &format!("must be at least {MIN_MEMORY_MIB}"),
            ));
        }
        if vm.memory_mib < MIN_MEMORY_MIB || vm.memory_mib > vm.max_memory_mib {
            return Err(value(
                "vm.memory_mib",
                &format!(
                    "{} is out of range; use {MIN_MEMORY_MIB}..={} (vm.max_memory_mib)",
                    vm.memory_mib, vm.max_memory_mib
                ),
            ));
        }
        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            return Err(value(
                "log_level",
                &format!(
                    "`{}` is not one of {}",
                    self.log_level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        if self.agent_log_in_shim != "off" && !LOG_LEVELS.contains(&self.agent_log_in_shim.as_str())
        {
            return Err(value(
                "agent_log_in_shim",
                &format!(
                    "`{}` is not one of off, {}",
                    self.agent_log_in_shim,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        for (key, ms) in [
            ("agent.connect_timeout_ms", self.agent.connect_timeout_ms),
            ("agent.call_timeout_ms", self.agent.call_timeout_ms),
            ("agent.stdio_timeout_ms", self.agent.stdio_timeout_ms),
            ("vmm.api_timeout_ms", self.vmm.api_timeout_ms),
        ] {
            if ms == 0 {
                return Err(value(key, "must be greater than 0"));
            }
        }
        if !self.state_dir.is_absolute() {
            return Err(value("state_dir", "must be an absolute path"));
        }
        if self.kernel_params.contains('\n') {
            return Err(value("kernel_params", "must be a single line"));
        }
        Ok(())
    }
}

fn value(key: &'static str, message: &str) -> Error {
    Error::ConfigValue {
        key,
        message: message.to_owned(),
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
