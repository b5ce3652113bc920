//! Bringing the guest up as PID 1: pseudo filesystems, kernel modules, the shared directory,
//! and powering off.

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

/// Where the load order written by the image builder lives (module paths, dependencies first).
pub const MODULE_ORDER: &str = "/lib/modules/load-order";
/// Where the virtio-fs share is mounted in the guest.
pub const SHARED_MOUNT: &str = cocoon_protocol::GUEST_SHARE;
/// The virtio-fs tag the host exports the share under.
pub const SHARED_TAG: &str = "cocoon";

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("mount {fstype} on {target}")),
    }
}

/// /proc first: everything after it (the command line, module list) reads it.
pub fn mount_proc() -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None)
}

/// The rest of the pseudo filesystems a container runtime expects.
pub fn mount_base() -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777"))?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None)?;
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmp",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

/// The module after which the agent's vsock listener can be bound.
pub const VSOCK_TRANSPORT: &str = "vmw_vsock_virtio_transport";
/// The module whose loading registers free page reporting (see [`tune_page_reporting`]).
pub const BALLOON: &str = "virtio_balloon";

/// Loads the modules listed in `order_file`, in that order, calling `after_each` with each
/// module's name. The image builder resolved the order from modules.dep, so each module's
/// dependencies are already in.
pub fn load_modules(order_file: &Path, mut after_each: impl FnMut(&str)) -> Result<Vec<String>> {
    let list =
        fs::read_to_string(order_file).with_context(|| format!("read {}", order_file.display()))?;
    let dir = order_file.parent().unwrap_or(Path::new("/"));
    let mut loaded = vec![];
    for rel in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = dir.join(rel);
        let t = crate::logger::uptime_ms();
        let file =
            fs::File::open(&path).with_context(|| format!("open module {}", path.display()))?;
        match finit_module(file.as_fd(), c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("load module {}", path.display())),
        }
        log::debug!("loaded {rel} in {} ms", crate::logger::uptime_ms() - t);
        let name = module_name(rel);
        after_each(&name);
        loaded.push(name);
    }
    Ok(loaded)
}

/// Free blocks of at least this order (2^N pages, here 128 KiB) are reported to the host by
/// the balloon. Measured on an idle 128 MiB guest, QEMU's resident guest RAM: order 9 (the
/// default) 104 MiB, 7: 89 MiB, 5: 73.5 MiB, 3 and 0: 73.4 MiB; 5 saves as much as any with
/// fewer, larger reports.
pub const PAGE_REPORTING_ORDER: u32 = 5;

/// Lets free page reporting return smaller free blocks than the kernel's default (one
/// pageblock, 2 MiB). After boot most of a small guest's free memory sits in blocks below
/// 2 MiB, which the host would otherwise keep resident. Kernel 6.1 overwrites a command-line
/// value when the balloon registers, so this is written after the driver loaded.
pub fn tune_page_reporting() {
    let p = "/sys/module/page_reporting/parameters/page_reporting_order";
    if let Err(e) = fs::write(p, PAGE_REPORTING_ORDER.to_string()) {
        log::warn!("cannot set {p}: {e}");
    }
}

/// `kernel/fs/fuse/virtiofs.ko` -> `virtiofs`.
fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    file.split(".ko").next().unwrap_or(file).to_owned()
}

/// Mounts the host's virtio-fs share; returns whether it is there.
pub fn mount_shared() -> Result<()> {
    mount_fs(
        SHARED_TAG,
        SHARED_MOUNT,
        "virtiofs",
        // Not nosuid: container roots live on the share, and a setuid program in an image
        // must work as under runc (the guest is the boundary; the host's side of every
        // rootfs and volume is nosuid on the host).
        MsFlags::MS_NODEV,
        None,
    )
}

/// How long a share plugged in while the guest runs may take to appear.
const SHARE_PLUG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Mounts the share that the host is plugging in now: the kernel refuses the mount (EINVAL,
/// "tag not found") until the device is there.
pub fn mount_share_when_plugged() -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        match mount_shared() {
            Ok(()) => {
                log::info!(
                    "share mounted {} ms after it was asked for",
                    t0.elapsed().as_millis()
                );
                return Ok(());
            }
            Err(e) if t0.elapsed() > SHARE_PLUG_WAIT => {
                return Err(e.context(format!("no share within {SHARE_PLUG_WAIT:?}")))
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

/// A template guest: zeroes free memory (`scrub.rs`, a smaller template) and tells the host
/// the guest is ready to be saved. Each pod restored from it gets its vsock device, and its
/// share if it needs one, hot-plugged; the share is mounted when a container needs it
/// ([`mount_share_when_plugged`]).
pub fn template_ready() -> Result<()> {
    let t = crate::logger::uptime_ms();
    match crate::scrub::zero_free_memory() {
        Ok(n) => log::info!(
            "zeroed {} MiB of free memory in {} ms",
            n >> 20,
            crate::logger::uptime_ms() - t
        ),
        // Only the template's size depends on it.
        Err(e) => log::warn!("free memory not zeroed: {e:#}"),
    }
    // Straight to the console whatever the log level: the host waits for this line.
    eprintln!("{}", cocoon_protocol::TEMPLATE_READY);
    anyhow::bail!("not plugged in yet (a VM template)")
}

/// Empties the old initramfs root, freeing its memory; `keep` is the new root. Only called
/// once every mount has moved out, so nothing here can reach into a mounted filesystem.
fn clear_tree(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p == keep {
            continue;
        }
        let _ = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

/// The mounts that move from the initramfs to the new root (submounts move with them).
const MOVED_MOUNTS: [&str; 5] = ["/proc", "/sys", "/dev", "/run", "/tmp"];

/// The outcome of the background bring-up (modules, virtio-fs share).
#[derive(Debug, Clone)]
pub struct Booted {
    pub loaded_modules: Vec<String>,
    /// Ok once the share is mounted, else why not.
    pub shared: Result<(), String>,
}

/// Moves the guest from the initramfs onto a tmpfs root, in place.
///
/// `pivot_root(2)` refuses to work when the current root is the initramfs, and container
/// runtimes need it for a proper root switch; the classic `switch_root` dance fixes that.
/// It runs after every module is loaded, so nothing needs copying: the pseudo filesystems
/// move over, the initramfs is emptied, and the running agent keeps its (now unlinked) image;
/// `/proc/self/exe` still executes it for the runner.
/// With `debug_shell`, busybox and its applets come along (`keep_debug_shell`).
pub fn switch_root(debug_shell: bool) -> Result<()> {
    let new = Path::new("/newroot");
    mount_fs(
        "root",
        "/newroot",
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    for m in MOVED_MOUNTS {
        let target = new.join(m.trim_start_matches('/'));
        fs::create_dir_all(&target)?;
        mount(
            Some(m),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("move {m} to the new root"))?;
    }
    let kept = keep_on_demand_modules(new);
    if debug_shell {
        match keep_debug_shell(new) {
            Ok(n) => log::warn!("debug console enabled: busybox with {n} applets in /bin, /sbin"),
            Err(e) => log::warn!("debug console: no shell in the guest: {e:#}"),
        }
    }
    clear_tree(Path::new("/"), new);
    nix::unistd::chdir(new).context("chdir /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move the new root onto /")?;
    nix::unistd::chroot(".").context("chroot")?;
    nix::unistd::chdir("/").context("chdir /")?;
    // Shared, as systemd makes a host's root: a container that asks for `rslave`/`rshared`
    // propagation then receives (and, with rshared, sends) mounts as under runc on a host, and
    // the default (slave) sees what the agent mounts later. Mounts made after this are shared too.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SHARED,
        None::<&str>,
    )
    .context("make the root shared")?;
    match kept {
        Ok(0) => {}
        Ok(n) => {
            fs::write("/proc/sys/kernel/modprobe", crate::modprobe::HELPER)
                .context("set the kernel's modprobe helper")?;
            log::info!("{n} modules on demand (the agent is the kernel's modprobe)");
        }
        // Containers then miss those kernel features, as before; the pod still runs.
        Err(e) => log::warn!("modules on demand not kept: {e:#}"),
    }
    Ok(())
}

/// Copies the on-demand modules (`modprobe.rs`) and their index from the initramfs into the
/// new root, at the same paths, before the initramfs is emptied; returns how many.
fn keep_on_demand_modules(new: &Path) -> Result<usize> {
    let index_path = Path::new(crate::modprobe::ON_DEMAND_INDEX);
    let Ok(text) = fs::read_to_string(index_path) else {
        return Ok(0); // an image without them
    };
    let index = crate::modprobe::Index::parse(&text);
    let dir = index_path.parent().unwrap_or(Path::new("/"));
    let files = index.files();
    for rel in &files {
        let (from, to) = (dir.join(rel), new.join(dir.strip_prefix("/")?).join(rel));
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(&from, &to).with_context(|| format!("keep {}", from.display()))?;
    }
    fs::write(new.join(index_path.strip_prefix("/")?), text)?;
    Ok(files.len())
}

/// Where the image keeps busybox for the debug console, and its applets' paths
/// (`busybox --list-full`, written by `rootfs/`).
const DEBUG_SHELL: &str = "/lib/cocoon/busybox";
const DEBUG_APPLETS: &str = "/lib/cocoon/busybox.applets";

/// Copies busybox into the new root as `/bin/busybox` with a link for each applet, for the
/// debug console's commands; answers how many links. Only in a VM booted with the console:
/// in any other the guest has no shell at all.
fn keep_debug_shell(new: &Path) -> Result<usize> {
    let bin = new.join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(DEBUG_SHELL, bin.join("busybox")).context("copy busybox")?;
    let applets = fs::read_to_string(DEBUG_APPLETS).context("read the applet list")?;
    let mut n = 0;
    for rel in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let link = new.join(rel.trim_start_matches('/'));
        if link.exists() || rel.contains("..") {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .with_context(|| format!("link {}", link.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Flushes and powers the VM off. Never returns on success.
pub fn power_off() -> Result<()> {
    nix::unistd::sync();
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF)
        .context("reboot(POWER_OFF)")?;
    Ok(())
}

/// `key=value` pairs from the kernel command line that belong to the agent (`cocoon.*`).
pub fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_params() {
        let c = "console=ttyS0 quiet cocoon.log=debug cocoon.mode=bare";
        assert_eq!(cmdline_param(c, "cocoon.log").as_deref(), Some("debug"));
        assert_eq!(cmdline_param(c, "cocoon.mode").as_deref(), Some("bare"));
        assert_eq!(cmdline_param(c, "cocoon.none"), None);
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/fuse/virtiofs.ko"), "virtiofs");
        assert_eq!(module_name("kernel/net/vmw_vsock/vsock.ko.xz"), "vsock");
    }
}
