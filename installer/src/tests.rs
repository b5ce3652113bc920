//! install and uninstall on scratch node roots: what they add, that twice is once, and that
//! uninstall leaves the node as it was, down to containerd's config file itself.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{install, uninstall, Artifacts, Error, Node, ARTIFACTS, CONTAINERD_CONFIG, DROPIN};

/// A node with containerd and a config of its own, and an image's artifacts.
fn scratch() -> (tempfile::TempDir, Node, Artifacts) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("node");
    let node = Node::new(&root);
    for d in ["usr/bin", "etc/containerd", "usr/local/bin", "opt"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("usr/bin/containerd"), b"").unwrap();
    let config = root.join("etc/containerd/config.toml");
    std::fs::write(&config, "version = 2\n\n[plugins]\n  # the operator's\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let art = dir.path().join("image");
    for rel in ARTIFACTS {
        let p = art.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("{rel} contents\n")).unwrap();
        let mode = if rel.starts_with("bin/") || rel.starts_with("libexec/") {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    (dir, node, Artifacts { dir: art })
}

/// Every entry under the root: its kind, mode, contents or link target, and mtime for files.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            let v = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                format!(
                    "file {:o} {} ino {} {:?}",
                    m.mode() & 0o7777,
                    m.mtime_nsec(),
                    m.ino(),
                    std::fs::read(&p).unwrap()
                )
            };
            out.insert(rel, v);
        }
    }
    out
}

#[test]
fn install_adds_twice_is_once_and_uninstall_gives_the_node_back() {
    let (_d, node, art) = scratch();
    let before = snapshot(node.root());

    let first = install(&node, &art).unwrap();
    assert!(first.containerd_changed);
    let shim = node.path("/opt/cocoon/bin/containerd-shim-cocoon-v2");
    assert_eq!(
        std::fs::metadata(&shim).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(node.path("/usr/local/bin/containerd-shim-cocoon-v2")).unwrap(),
        Path::new("/opt/cocoon/bin/containerd-shim-cocoon-v2")
    );
    assert_eq!(
        std::fs::read(node.path(DROPIN)).unwrap(),
        b"etc/containerd-cocoon.toml contents\n"
    );
    let config = std::fs::read_to_string(node.path(CONTAINERD_CONFIG)).unwrap();
    assert!(
        config.contains("imports = [\"/etc/containerd/conf.d/*.toml\"]"),
        "{config}"
    );
    assert!(config.contains("# the operator's"), "{config}");
    let mode = std::fs::metadata(node.path(CONTAINERD_CONFIG))
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the config keeps its mode");
    assert!(node.path("/etc/cocoon/config.toml").is_file());

    let once = snapshot(node.root());
    let second = install(&node, &art).unwrap();
    assert_eq!(second.changes, Vec::<String>::new());
    assert!(!second.containerd_changed);
    assert_eq!(
        snapshot(node.root()),
        once,
        "a second install changed the node"
    );

    let gone = uninstall(&node).unwrap();
    assert!(gone.containerd_changed);
    assert_eq!(
        snapshot(node.root()),
        before,
        "uninstall left the node changed"
    );
    // And again: nothing to do.
    assert_eq!(uninstall(&node).unwrap().changes, Vec::<String>::new());
    assert_eq!(snapshot(node.root()), before);
}

#[test]
fn a_node_without_a_containerd_config_gets_one_and_loses_it_again() {
    let (_d, node, art) = scratch();
    std::fs::remove_file(node.path(CONTAINERD_CONFIG)).unwrap();
    std::fs::remove_dir(node.path("/etc/containerd")).unwrap();
    let before = snapshot(node.root());
    install(&node, &art).unwrap();
    let config = std::fs::read_to_string(node.path(CONTAINERD_CONFIG)).unwrap();
    assert!(config.contains("conf.d/*.toml"), "{config}");
    uninstall(&node).unwrap();
    assert_eq!(snapshot(node.root()), before);
}

#[test]
fn the_operators_edits_to_cocoons_config_are_kept() {
    let (_d, node, art) = scratch();
    install(&node, &art).unwrap();
    std::fs::write(
        node.path("/etc/cocoon/config.toml"),
        "log_level = \"debug\"\n",
    )
    .unwrap();
    let gone = uninstall(&node).unwrap();
    assert!(
        gone.kept
            .iter()
            .any(|k| k.contains("/etc/cocoon/config.toml")),
        "{gone:?}"
    );
    assert!(node.path("/etc/cocoon/config.toml").is_file());
    assert!(!node.path("/opt/cocoon").exists());
}

#[test]
fn nodes_it_cant_serve_or_another_install_are_refused() {
    let (_d, node, art) = scratch();
    std::fs::remove_file(node.path("/usr/bin/containerd")).unwrap();
    std::fs::remove_file(node.path(CONTAINERD_CONFIG)).unwrap();
    std::fs::remove_dir(node.path("/etc/containerd")).unwrap();
    let e = install(&node, &art).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("no containerd"), "{e}");
    assert!(!node.path("/opt/cocoon").exists());

    let (_d, node, art) = scratch();
    std::fs::write(
        node.path("/usr/local/bin/containerd-shim-cocoon-v2"),
        b"make install's",
    )
    .unwrap();
    let e = install(&node, &art).unwrap_err();
    assert!(matches!(e, Error::InTheWay(_)), "{e}");
    assert!(e.to_string().contains("installed another way"), "{e}");

    let (_d, node, art) = scratch();
    std::fs::create_dir_all(node.path("/etc/containerd/conf.d")).unwrap();
    std::fs::write(node.path(DROPIN), b"make install's").unwrap();
    let e = install(&node, &art).unwrap_err();
    assert!(matches!(e, Error::InTheWay(_)), "{e}");

    let (_d, node, mut art) = scratch();
    art.dir = art.dir.join("nothing-here");
    let e = install(&node, &art).unwrap_err();
    assert!(e.to_string().contains("the image lacks"), "{e}");
}
