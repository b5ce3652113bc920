//! cocoon-rootfs: builds and installs the guest image (`make image`).
//!
//! Kernel: Debian's `linux-image-cloud-amd64`, fetched with `apt-get download`, so the guest
//! kernel comes from the same signed archive as the rest of the host. Initramfs: cocoon-agent
//! as /init plus the modules it loads (every virtio piece is a module in this kernel).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cocoon_rootfs::initramfs::Initramfs;
use cocoon_rootfs::modules::{module_name, strip_signature, ModulesDep};
use cocoon_rootfs::on_demand::{plan as plan_on_demand, ON_DEMAND};
use sha2::{Digest, Sha256};

const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The debug console's shell and tools (`cocoon exec`): one static binary, copied into the
/// guest's root only in a VM booted with the console (agent/src/init.rs).
const SHELL_PACKAGE: &str = "busybox-static";
/// What the agent needs: PCI transport, vsock for its API, virtio-fs for rootfs, overlay, and
/// the balloon for free page reporting, virtio-net for the pod's NICs, virtio-scsi, SCSI
/// disks and EROFS for the image layers (issue #29). Loaded in this order (vsock first: the
/// API waits on it).
const MODULES: [&str; 11] = [
    "virtio_pci",
    // The agent's key arrives as a fw_cfg item (`cocoon_protocol::auth`).
    "qemu_fw_cfg",
    "vmw_vsock_virtio_transport",
    // The agent's channel when the host chooses virtio-serial over vsock (`vsock = "serial"`).
    "virtio_console",
    "virtiofs",
    "overlay",
    "virtio_balloon",
    "virtio_net",
    "virtio_scsi",
    "sd_mod",
    "erofs",
];

struct Args {
    agent: PathBuf,
    out: PathBuf,
    work: PathBuf,
}

fn usage() -> String {
    "usage: cocoon-rootfs --agent PATH [--out DIR (default /usr/local/share/cocoon)] [--work DIR (default target/image)]".into()
}

fn parse_args() -> Result<Args> {
    let mut agent = None;
    let mut out = PathBuf::from("/usr/local/share/cocoon");
    let mut work = PathBuf::from("target/image");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .map(PathBuf::from)
                .with_context(|| format!("{a} needs a value\n{}", usage()))
        };
        match a.as_str() {
            "--agent" => agent = Some(val()?),
            "--out" => out = val()?,
            "--work" => work = val()?,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    let agent = agent.with_context(usage)?;
    Ok(Args { agent, out, work })
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {cmd:?} (is it installed? run `make setup`)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The metapackage only depends on the real, versioned kernel package.
fn kernel_package() -> Result<String> {
    let deps = run(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned)
        .with_context(|| {
            format!("apt-cache knows no kernel behind {META_PACKAGE}; run `apt-get update`")
        })
}

fn download(pkg: &str, work: &Path) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        Ok(fs::read_dir(work)?.flatten().map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with(&format!("{pkg}_"))
                    && n.to_string_lossy().ends_with(".deb")
            })
        }))
    };
    if let Some(deb) = find()? {
        println!("using cached {}", deb.display());
        return Ok(deb);
    }
    println!("apt-get download {pkg}");
    run(Command::new("apt-get")
        .arg("download")
        .arg(pkg)
        .current_dir(work))?;
    find()?.with_context(|| format!("apt-get download {pkg} left no .deb in {}", work.display()))
}

/// busybox from its Debian package, and the paths of its applets (`--list-full`, asked of the
/// binary itself: it is static and runs on the host too).
fn debug_shell(work: &Path) -> Result<(Vec<u8>, String)> {
    let deb = download(SHELL_PACKAGE, work)?;
    let tree = work.join("busybox");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let bin = tree.join("bin/busybox");
    let applets = run(Command::new(&bin).arg("--list-full"))?;
    let data = fs::read(&bin).with_context(|| format!("read {}", bin.display()))?;
    Ok((data, applets))
}

fn install(out: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = out.join(format!(".{name}.tmp"));
    fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, out.join(name))
        .with_context(|| format!("install {name} into {}", out.display()))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let agent = fs::read(&args.agent).with_context(|| {
        format!(
            "read the agent binary {} (build it with `make build`)",
            args.agent.display()
        )
    })?;
    fs::create_dir_all(&args.work)?;
    let work = args.work.canonicalize()?;

    let pkg = kernel_package()?;
    let deb = download(&pkg, &work)?;
    let deb_bytes = fs::read(&deb)?;
    let version = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?
        .trim()
        .to_owned();

    let tree = work.join("kernel");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let release = fs::read_dir(tree.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules")?;
    // The package ships no modules.dep; depmod writes it.
    run(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    let moddir = tree.join("lib/modules").join(&release);
    let dep = ModulesDep::parse(&fs::read_to_string(moddir.join("modules.dep"))?)?;
    let order = dep.load_order(&MODULES)?;

    let mut img = Initramfs::new();
    img.file("init", 0o755, agent.clone())?;
    img.char_dev("dev/console", 0o600, 5, 1)?;
    for d in ["proc", "sys", "run", "tmp", "root", "etc"] {
        img.dir(d, 0o755)?;
    }
    let mut load_order = String::new();
    for rel in &order {
        let data = fs::read(moddir.join(rel)).with_context(|| format!("read module {rel}"))?;
        img.file(
            &format!("lib/modules/{release}/{rel}"),
            0o644,
            strip_signature(&data).to_vec(),
        )?;
        load_order.push_str(&format!("{release}/{rel}\n"));
    }
    img.file("lib/modules/load-order", 0o644, load_order.into_bytes())?;
    // What the kernel may ask for later (agent/src/modprobe.rs).
    let aliases = fs::read_to_string(moddir.join("modules.alias"))?;
    let on_demand = plan_on_demand(&dep, &aliases, ON_DEMAND, &order, &format!("{release}/"))?;
    let mut on_demand_bytes = 0;
    for rel in &on_demand.files {
        let data = fs::read(moddir.join(rel)).with_context(|| format!("read module {rel}"))?;
        let data = strip_signature(&data).to_vec();
        on_demand_bytes += data.len();
        img.file(&format!("lib/modules/{release}/{rel}"), 0o644, data)?;
    }
    img.file("lib/modules/on-demand", 0o644, on_demand.index.into_bytes())?;
    let (busybox, applets) = debug_shell(&work)?;
    img.file("lib/cocoon/busybox", 0o755, busybox.clone())?;
    img.file("lib/cocoon/busybox.applets", 0o644, applets.into_bytes())?;
    let initramfs = img.write(Vec::new())?;

    let vmlinuz = fs::read(tree.join("boot").join(format!("vmlinuz-{release}")))?;
    let manifest = serde_json::json!({
        "kernel_package": pkg,
        "kernel_package_version": version,
        "kernel_package_sha256": sha256(&deb_bytes),
        "kernel_release": release,
        "vmlinuz_sha256": sha256(&vmlinuz),
        "initramfs_sha256": sha256(&initramfs),
        "initramfs_bytes": initramfs.len(),
        "agent_sha256": sha256(&agent),
        "modules": order.iter().map(|p| module_name(p)).collect::<Vec<_>>(),
        "on_demand_modules": on_demand.files.iter().map(|p| module_name(p)).collect::<Vec<_>>(),
        "on_demand_bytes": on_demand_bytes,
        "busybox_sha256": sha256(&busybox),
    });
    fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    install(&args.out, "vmlinuz", &vmlinuz)?;
    install(&args.out, "initramfs.img", &initramfs)?;
    install(
        &args.out,
        "manifest.json",
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    println!(
        "installed guest image in {}: kernel {release} ({pkg} {version}), initramfs {} KiB, {} modules, {} more on demand ({} KiB)",
        args.out.display(),
        initramfs.len() / 1024,
        order.len(),
        on_demand.files.len(),
        on_demand_bytes / 1024
    );
    Ok(())
}
