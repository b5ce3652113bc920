//! `make deploy-image`: the deploy image (issue #32) as an OCI image layout archive, built
//! locally (no registry, no Docker): one layer holding `/opt/cocoon-artifacts/`, everything
//! `cocoon-deploy install` puts on a node, and nothing else (static binaries need no
//! userland). QEMU is not in it: nodes use their distribution's (docs/kubernetes.md).
//!
//! `cocoon-deploy-image --out FILE --shim B --cli B --deploy B --virtiofsd B
//! --vhost-device-vsock B --image-dir DIR`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a build tool: a panic is its error report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The image's name, as deploy/daemonset.yaml pulls it.
const NAME: &str = "localhost/cocoon-deploy:0.1.0";

fn arg(args: &[String], flag: &str) -> PathBuf {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} is required"));
    PathBuf::from(&args[i + 1])
}

/// Cocoon's config for a node: the shipped defaults, with the guest image and helpers where
/// the installer puts them.
fn node_config(shipped: &str) -> String {
    let mut out = String::new();
    for line in shipped.lines() {
        let l = match line.split_once('=').map(|(k, _)| k.trim()) {
            Some("kernel") => "kernel = \"/opt/cocoon/share/vmlinuz\"".to_owned(),
            Some("initramfs") => "initramfs = \"/opt/cocoon/share/initramfs.img\"".to_owned(),
            Some("virtiofsd") => "virtiofsd = \"/opt/cocoon/libexec/virtiofsd\"".to_owned(),
            Some("vhost_device_vsock") => {
                "vhost_device_vsock = \"/opt/cocoon/libexec/vhost-device-vsock\"".to_owned()
            }
            _ => line.to_owned(),
        };
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn put(root: &Path, rel: &str, data: &[u8], mode: u32) {
    let p = root.join("opt/cocoon-artifacts").join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = arg(&args, "--out");
    let image_dir = arg(&args, "--image-dir");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for (flag, rel) in [
        ("--shim", "bin/containerd-shim-cocoon-v2"),
        ("--cli", "bin/cocoon"),
        ("--deploy", "bin/cocoon-deploy"),
        ("--virtiofsd", "libexec/virtiofsd"),
        ("--vhost-device-vsock", "libexec/vhost-device-vsock"),
    ] {
        let bin = arg(&args, flag);
        put(
            r,
            rel,
            &std::fs::read(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display())),
            0o755,
        );
    }
    for f in ["vmlinuz", "initramfs.img", "manifest.json"] {
        put(
            r,
            &format!("share/{f}"),
            &std::fs::read(image_dir.join(f)).unwrap(),
            0o644,
        );
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = std::fs::read_to_string(here.join("config/config.toml")).unwrap();
    put(
        r,
        "etc/config.toml",
        node_config(&shipped).as_bytes(),
        0o644,
    );
    let dropin = std::fs::read(here.join("config/containerd-cocoon.toml")).unwrap();
    put(r, "etc/containerd-cocoon.toml", &dropin, 0o644);
    put(
        r,
        "VERSION",
        format!("{}\n", env!("CARGO_PKG_VERSION")).as_bytes(),
        0o644,
    );
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let config = serde_json::json!({
        "Entrypoint": ["/opt/cocoon-artifacts/bin/cocoon-deploy"],
        "Cmd": ["--help"],
        "WorkingDir": "/",
    });
    cocoon_tests::containerd::write_image_layout(&out, NAME, r, config, None);
    println!("wrote {} ({NAME})", out.display());
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_node_config_points_at_the_prefix_and_is_valid() {
        let shipped = include_str!("../../../config/config.toml");
        let text = super::node_config(shipped);
        let cfg = vmm_driver::Config::parse(&text).unwrap();
        assert_eq!(
            cfg.kernel,
            std::path::Path::new("/opt/cocoon/share/vmlinuz")
        );
        assert_eq!(
            cfg.paths.virtiofsd,
            std::path::Path::new("/opt/cocoon/libexec/virtiofsd")
        );
    }
}
