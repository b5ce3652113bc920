//! The QEMU command line, built as a pure function of [`QemuLaunch`] so it can be unit-tested.
//!
//! Machine choice: q35 with SeaBIOS. Measured on these machines under TCG (boot to poweroff,
//! trivial init, best of 3): q35+SeaBIOS 1.88 s, q35+qboot 1.97 s, microvm 2.19 s. Under TCG the
//! kernel's own boot dominates, and q35 keeps plain PCI for the vhost-user devices.

use std::path::PathBuf;

use super::version::QemuVersion;
use crate::accel::Chosen;

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct QemuLaunch {
    pub name: String,
    /// The release that runs it (`version.rs`).
    pub version: QemuVersion,
    pub accel: Chosen,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// The console relay's socket (`console.rs`); QEMU connects to it.
    pub console_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub vsock: VsockDevice,
    /// vhost-user socket of the virtiofsd exporting the shared dir; None for a VM that starts
    /// without the share (`late_share.rs` plugs it in later, on the [`FS_PORT`] root port).
    pub virtiofs_socket: Option<PathBuf>,
    pub virtiofs_tag: String,
    pub nics: Vec<NicArg>,
    /// Free PCIe root ports for NICs hot-plugged later (`hotplug.rs`), named
    /// `HOTPLUG_PORT<n>`.
    pub hotplug_slots: u8,
    /// The unprivileged `uid:gid` QEMU switches to once it opened everything (`-runas`).
    pub run_as: Option<(u32, u32)>,
    /// This launch's part in a VM template (`template.rs`); None boots the kernel.
    pub template: Option<TemplateRole>,
    /// Guest RAM in this file (`memory-backend-file`, shared) instead of an anonymous memfd: a
    /// template's RAM is kept in its directory, and a restored pod's is a memfd the driver
    /// filled from it, named `/proc/self/fd/<n>`. Shared either way: vhost-user daemons map it.
    pub ram_file: Option<PathBuf>,
    /// Map `ram_file` copy-on-write from a file QEMU opens read-only (`readonly=on,rom=off`,
    /// QEMU 8.2 on): a clone of the template that shares its pages with every other clone
    /// (`restore.rs`). Only for a VM without vhost-user devices, whose daemons need shared RAM.
    pub ram_private: bool,
    /// The file holding the agent's key, handed to the guest as the fw_cfg item
    /// `cocoon_protocol::auth::KEY_FW_CFG` (QEMU reads it before `-runas`).
    pub agent_key: Option<PathBuf>,
}

impl QemuLaunch {
    /// Guest RAM in bytes: the size of the memfd or file behind `-m`.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// How a launch relates to a VM template. Both roles make the same machine: migration needs
/// the restoring QEMU's devices to be the saved one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateRole {
    /// Boots the template guest: no vsock or virtio-fs device (vhost-user-vsock can't be
    /// migrated, and each pod needs its own share), but free root ports to plug them into.
    Build,
    /// Restores a pod from the saved template (`-incoming defer`, paused afterwards). The
    /// vsock and virtio-fs chardevs connect to the pod's daemons at start, while QEMU is still
    /// root; the devices on them are hot-plugged once the state is in.
    Restore,
}

/// Root port of a template pod's hot-plugged vsock device.
pub const VSOCK_PORT: &str = "tvsock";
/// Root port of a template pod's hot-plugged virtio-fs device.
pub const FS_PORT: &str = "tfs";
/// The chardev ids of the vhost-user vsock and virtio-fs backends.
pub const VSOCK_CHARDEV: &str = "vsock0";
pub const FS_CHARDEV: &str = "fs0";

/// The `device_add` arguments of the share's device on its root port ([`FS_PORT`]): at a
/// template restore, and when the share is plugged in later (`late_share.rs`).
pub fn fs_device_args(tag: &str) -> serde_json::Value {
    serde_json::json!({"driver": "vhost-user-fs-pci", "id": "fs", "chardev": FS_CHARDEV,
        "tag": tag, "bus": FS_PORT})
}

/// The id prefix of the root ports kept free for hot-plugged NICs.
pub const HOTPLUG_PORT: &str = "hp";

/// A virtio-net device on a tap QEMU inherits as `fd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    pub fd: i32,
    pub mac: String,
    /// In-kernel vhost-net: only where `/dev/vhost-net` exists (QEMU fails otherwise).
    pub vhost: bool,
}

/// The guest's vsock device.
#[derive(Debug, Clone)]
pub enum VsockDevice {
    /// vhost-user-vsock-pci backed by a vhost-device-vsock daemon on this socket.
    VhostUser(PathBuf),
    /// In-kernel vhost-vsock with this context id.
    Kernel { cid: u32 },
    /// No vsock: the agent's channel is a virtio-serial port whose chardev QEMU serves on this
    /// socket (`serial.rs`). QEMU's own device, migrated with the rest: templates have it too.
    Serial(PathBuf),
}

/// The chardev id of the agent's virtio-serial port.
pub const SERIAL_CHARDEV: &str = "agentch";

fn p(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// QEMU's arguments, in order.
/// The emulated CPU: everything TCG can do except ERMS/FSRM ("fast" `rep movsb`/`stosb`).
/// With them the guest kernel zeroes every new page and copies to and from user memory with
/// one `rep` instruction, which TCG runs a byte per iteration; without them it uses unrolled
/// 8-byte loops, translated once. Zeroing 163 MiB in the guest took 2.8 s with and 0.9-1.3 s
/// without (docs/performance.md).
const TCG_CPU: &str = "max,-erms,-fsrm";

/// The guest RAM backend's id, which is also its RAM block's name in a saved state.
pub(crate) const RAM_BACKEND: &str = "mem";

pub fn qemu_args(l: &QemuLaunch) -> Vec<String> {
    let mut a: Vec<String> = Vec::with_capacity(48);
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| (*s).to_owned()));
    // TCG's translation cache defaults to 1 GiB of address space; a pod's guest needs far
    // less, and every cached MiB it fills is host RSS. See TCG_TB_SIZE_MIB for the size.
    let (accel, cpu) = match l.accel {
        Chosen::Kvm => ("kvm".to_owned(), "host"),
        Chosen::Tcg => (format!("tcg,tb-size={TCG_TB_SIZE_MIB}"), TCG_CPU),
    };
    let mem = format!("{}M", l.memory_mib);
    push(&["-name", &l.name]);
    push(&["-machine", "q35"]);
    push(&["-accel", &accel]);
    push(&["-cpu", cpu]);
    push(&["-smp", &l.vcpus.to_string()]);
    push(&["-m", &mem]);
    // vhost-user devices need guest memory the daemons can map: shared, and backed by a file
    // descriptor QEMU can hand them.
    let backend = match &l.ram_file {
        Some(f) if l.ram_private => format!(
            "memory-backend-file,id={RAM_BACKEND},size={mem},mem-path={},share=off,readonly=on,rom=off",
            p(f)
        ),
        Some(f) => format!(
            "memory-backend-file,id={RAM_BACKEND},size={mem},mem-path={},share=on",
            p(f)
        ),
        None => format!("memory-backend-memfd,id={RAM_BACKEND},size={mem},share=on"),
    };
    push(&["-object", &backend]);
    push(&["-numa", &format!("node,memdev={RAM_BACKEND}")]);
    push(&[
        "-kernel",
        &p(&l.kernel),
        "-initrd",
        &p(&l.initramfs),
        "-append",
        &l.cmdline,
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
    ]);
    // QEMU's seccomp filter: the guest is hostile, so a QEMU it subverts must not be able to
    // exec, gain privileges, change scheduling/affinity or use obsolete syscalls.
    push(&["-sandbox", SECCOMP_SANDBOX]);
    // Root only while it sets up (KVM, vhost-user and console sockets, taps, QMP): QEMU then
    // becomes an unprivileged user with no capabilities, before the guest runs a cycle.
    if let Some((uid, gid)) = l.run_as {
        if l.version.has_run_with_user() {
            push(&["-run-with", &format!("user={uid}:{gid}")]);
        } else {
            push(&["-runas", &format!("{uid}:{gid}")]);
        }
    }
    push(&[
        "-chardev",
        &format!("socket,id=con0,path={}", p(&l.console_socket)),
        "-serial",
        "chardev:con0",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", p(&l.qmp_socket)),
    ]);
    if let Some(key) = &l.agent_key {
        push(&[
            "-fw_cfg",
            &format!("name={},file={}", cocoon_protocol::auth::KEY_FW_CFG, p(key)),
        ]);
    }
    // A cold boot has its devices from the start; a template has none (and root ports for
    // them, below); a restore connects their backends now and adds the devices later.
    let devices = l.template.is_none();
    match &l.vsock {
        VsockDevice::VhostUser(sock) if l.template != Some(TemplateRole::Build) => {
            push(&[
                "-chardev",
                &format!("socket,id={VSOCK_CHARDEV},path={}", p(sock)),
            ]);
            if devices {
                push(&[
                    "-device",
                    &format!("vhost-user-vsock-pci,chardev={VSOCK_CHARDEV}"),
                ]);
            }
        }
        VsockDevice::Kernel { cid } if devices => {
            push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}")]);
        }
        // Port 0 is the console's; the agent's is 1, so two ports are all it needs.
        VsockDevice::Serial(sock) => push(&[
            "-chardev",
            &format!(
                "socket,id={SERIAL_CHARDEV},path={},server=on,wait=off",
                p(sock)
            ),
            "-device",
            "virtio-serial-pci,id=vser0,max_ports=2",
            "-device",
            &format!(
                "virtserialport,bus=vser0.0,nr=1,chardev={SERIAL_CHARDEV},name={}",
                cocoon_protocol::SERIAL_PORT_NAME
            ),
        ]),
        _ => {}
    }
    let fs_socket = l
        .virtiofs_socket
        .as_ref()
        .filter(|_| l.template != Some(TemplateRole::Build));
    if let Some(sock) = fs_socket {
        push(&[
            "-chardev",
            &format!("socket,id={FS_CHARDEV},path={}", p(sock)),
        ]);
    }
    if devices && l.virtiofs_socket.is_some() {
        push(&[
            "-device",
            &format!(
                "vhost-user-fs-pci,chardev={FS_CHARDEV},tag={}",
                l.virtiofs_tag
            ),
        ]);
    }
    for (i, n) in l.nics.iter().enumerate() {
        let vhost = if n.vhost { "on" } else { "off" };
        push(&[
            "-netdev",
            &format!("tap,id=net{i},fd={},vhost={vhost}", n.fd),
        ]);
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={}", n.mac),
        ]);
    }
    // q35 hot-plugs PCIe devices only into a root port, one device each; the guest's pciehp
    // (built into Debian's cloud kernel) picks them up.
    for i in 0..l.hotplug_slots {
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id={HOTPLUG_PORT}{i},bus=pcie.0,chassis={}",
                u32::from(i) + 1
            ),
        ]);
    }
    let ports: &[(&str, u32)] = match (l.template.is_some(), l.virtiofs_socket.is_some()) {
        (true, _) => &[(VSOCK_PORT, 64), (FS_PORT, 65)],
        // A cold boot without the share keeps the share's port free for it.
        (false, false) => &[(FS_PORT, 65)],
        (false, true) => &[],
    };
    for (id, chassis) in ports {
        push(&[
            "-device",
            &format!("pcie-root-port,id={id},bus=pcie.0,chassis={chassis}"),
        ]);
    }
    // Layer images arrive as LUNs on this controller (`disks.rs`); it is there from the
    // start in every VM, so that templates and cold boots have one device set.
    push(&[
        "-device",
        &format!("virtio-scsi-pci,id={}", super::disks::SCSI_CONTROLLER),
    ]);
    // Free page reporting: the guest hands memory it freed back, so an idle pod's host
    // footprint follows what the guest uses rather than what it once touched.
    push(&["-device", "virtio-balloon-pci,free-page-reporting=on"]);
    if l.template == Some(TemplateRole::Restore) {
        // Wait for `migrate-incoming`, and stay paused after it until the devices are in.
        push(&["-incoming", "defer", "-S"]);
    }
    a
}

/// QEMU's `-sandbox` setting. `elevateprivileges` is allowed because `-runas` needs set*id
/// calls and QEMU installs its filter before it switches users (with `deny` it dies with
/// SIGSYS, checked on 7.2). After the switch QEMU holds no capability, so those calls can't
/// regain anything: they only move among the unprivileged ids it already has.
pub const SECCOMP_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// Size of TCG's translation cache. A full cache is flushed whole and every guest code path is
/// translated again. 32 MiB was enough for a kernel boot, but a pod restored from the template
/// filled it while creating its first container: start took 250-310 ms instead of 50-60, and
/// the runner 600 ms instead of 370 (docs/performance.md). 128 MiB leaves room for the
/// workload's own code; the host pays only for what is filled (a restored pod's QEMU RSS grew
/// ~5 MiB, after its first container, over the 32 MiB cap).
pub const TCG_TB_SIZE_MIB: u32 = 128;

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(accel: Chosen, vsock: VsockDevice) -> QemuLaunch {
        QemuLaunch {
            name: "cocoon-abc".into(),
            version: crate::qemu::version::QemuVersion::new(7, 2),
            accel,
            vcpus: 2,
            memory_mib: 256,
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "console=ttyS0 quiet".into(),
            console_socket: "/r/console.sock".into(),
            qmp_socket: "/r/qmp.sock".into(),
            vsock,
            virtiofs_socket: Some("/r/fs.sock".into()),
            virtiofs_tag: "cocoon".into(),
            nics: vec![],
            hotplug_slots: 0,
            run_as: Some((1_879_048_200, 1_879_048_200)),
            template: None,
            ram_file: None,
            ram_private: false,
            agent_key: Some("/run/x/agent-key".into()),
        }
    }

    #[test]
    fn the_serial_channel_is_the_same_device_in_every_role_and_no_vsock() {
        let args = |role| {
            let mut l = launch(Chosen::Tcg, VsockDevice::Serial("/r/agent.sock".into()));
            l.template = role;
            qemu_args(&l)
        };
        for role in [None, Some(TemplateRole::Build), Some(TemplateRole::Restore)] {
            let a = args(role);
            assert!(values(&a, "-chardev")
                .contains(&"socket,id=agentch,path=/r/agent.sock,server=on,wait=off"));
            let devices = values(&a, "-device");
            assert!(devices.contains(&"virtio-serial-pci,id=vser0,max_ports=2"));
            assert!(devices
                .contains(&"virtserialport,bus=vser0.0,nr=1,chardev=agentch,name=io.cocoon.agent"));
            assert!(
                !devices.iter().any(|d| d.contains("vsock-pci")),
                "{devices:?}"
            );
        }
    }

    #[test]
    fn a_template_has_free_ports_for_its_devices_and_a_restore_only_their_backends() {
        let mut l = launch(Chosen::Tcg, VsockDevice::VhostUser("/r/vhost.sock".into()));
        l.hotplug_slots = 1;
        l.template = Some(TemplateRole::Build);
        let build = qemu_args(&l);
        assert_eq!(
            values(&build, "-chardev"),
            ["socket,id=con0,path=/r/console.sock"]
        );
        assert_eq!(
            values(&build, "-device"),
            [
                "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
                "pcie-root-port,id=tvsock,bus=pcie.0,chassis=64",
                "pcie-root-port,id=tfs,bus=pcie.0,chassis=65",
                "virtio-scsi-pci,id=scsi0",
                "virtio-balloon-pci,free-page-reporting=on"
            ]
        );
        assert!(values(&build, "-incoming").is_empty());
        l.template = Some(TemplateRole::Restore);
        let restore = qemu_args(&l);
        // The same machine: every device the template has, and nothing more.
        assert_eq!(values(&restore, "-device"), values(&build, "-device"));
        assert_eq!(
            values(&restore, "-chardev"),
            [
                "socket,id=con0,path=/r/console.sock",
                "socket,id=vsock0,path=/r/vhost.sock",
                "socket,id=fs0,path=/r/fs.sock"
            ]
        );
        assert_eq!(values(&restore, "-incoming"), ["defer"]);
        // A template's guest RAM is a file the driver keeps or fills, still shared.
        l.ram_file = Some("/proc/self/fd/3".into());
        assert_eq!(
            values(&qemu_args(&l), "-object"),
            ["memory-backend-file,id=mem,size=256M,mem-path=/proc/self/fd/3,share=on"]
        );
        assert!(restore.iter().any(|a| a == "-S"));
    }

    #[test]
    fn hotplug_slots_are_free_root_ports_with_their_own_chassis() {
        let mut l = launch(Chosen::Tcg, VsockDevice::Kernel { cid: 9 });
        let ports = |l: &QemuLaunch| -> Vec<String> {
            qemu_args(l)
                .windows(2)
                .filter(|w| w[0] == "-device" && w[1].starts_with("pcie-root-port"))
                .map(|w| w[1].clone())
                .collect()
        };
        assert!(ports(&l).is_empty());
        l.hotplug_slots = 2;
        assert_eq!(
            ports(&l),
            [
                "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
                "pcie-root-port,id=hp1,bus=pcie.0,chassis=2"
            ]
        );
    }

    #[test]
    fn each_nic_is_a_tap_fd_and_a_virtio_net_with_the_pod_mac() {
        let mut l = launch(Chosen::Tcg, VsockDevice::Kernel { cid: 9 });
        l.nics = vec![
            NicArg {
                fd: 3,
                mac: "02:00:00:00:00:01".into(),
                vhost: false,
            },
            NicArg {
                fd: 4,
                mac: "02:00:00:00:00:02".into(),
                vhost: true,
            },
        ];
        let args = qemu_args(&l);
        assert_eq!(
            values(&args, "-netdev"),
            ["tap,id=net0,fd=3,vhost=off", "tap,id=net1,fd=4,vhost=on"]
        );
        let devices = values(&args, "-device");
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01"));
        assert!(devices.contains(&"virtio-net-pci,netdev=net1,mac=02:00:00:00:00:02"));
        // No NIC, no network device at all (`-nodefaults` leaves none either).
        let bare = qemu_args(&launch(Chosen::Tcg, VsockDevice::Kernel { cid: 9 }));
        assert!(values(&bare, "-netdev").is_empty());
    }

    /// The value following `flag`, for every occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_hybrid_vsock_line() {
        let l = launch(Chosen::Tcg, VsockDevice::VhostUser("/r/vhost.sock".into()));
        let args = qemu_args(&l);
        assert_eq!(values(&args, "-machine"), ["q35"]);
        assert_eq!(values(&args, "-accel"), ["tcg,tb-size=128"]);
        assert_eq!(values(&args, "-cpu"), ["max,-erms,-fsrm"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-m"), ["256M"]);
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert_eq!(values(&args, "-numa"), ["node,memdev=mem"]);
        assert_eq!(values(&args, "-kernel"), ["/k"]);
        assert_eq!(values(&args, "-initrd"), ["/i"]);
        assert_eq!(values(&args, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(values(&args, "-serial"), ["chardev:con0"]);
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/r/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            values(&args, "-chardev"),
            [
                "socket,id=con0,path=/r/console.sock",
                "socket,id=vsock0,path=/r/vhost.sock",
                "socket,id=fs0,path=/r/fs.sock"
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "vhost-user-vsock-pci,chardev=vsock0",
                "vhost-user-fs-pci,chardev=fs0,tag=cocoon",
                "virtio-scsi-pci,id=scsi0",
                "virtio-balloon-pci,free-page-reporting=on"
            ]
        );
        assert!(args.iter().any(|a| a == "-nodefaults") && args.iter().any(|a| a == "-no-reboot"));
        assert_eq!(
            values(&args, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(values(&args, "-runas"), ["1879048200:1879048200"]);
        // QEMU 10 has no -runas.
        let mut l10 = l.clone();
        l10.version = crate::qemu::version::QemuVersion::new(10, 0);
        let args10 = qemu_args(&l10);
        assert_eq!(values(&args10, "-run-with"), ["user=1879048200:1879048200"]);
        assert!(values(&args10, "-runas").is_empty());
        // The agent's key goes as a fw_cfg item, by file: never on the command line.
        assert_eq!(
            values(&args, "-fw_cfg"),
            ["name=opt/io.cocoon/agent-key,file=/run/x/agent-key"]
        );
    }

    #[test]
    fn kvm_kernel_vsock_line() {
        let args = qemu_args(&launch(Chosen::Kvm, VsockDevice::Kernel { cid: 42 }));
        assert_eq!(values(&args, "-machine"), ["q35"]);
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        assert_eq!(
            values(&args, "-chardev"),
            [
                "socket,id=con0,path=/r/console.sock",
                "socket,id=fs0,path=/r/fs.sock"
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "vhost-vsock-pci,guest-cid=42",
                "vhost-user-fs-pci,chardev=fs0,tag=cocoon",
                "virtio-scsi-pci,id=scsi0",
                "virtio-balloon-pci,free-page-reporting=on"
            ]
        );
    }
}
