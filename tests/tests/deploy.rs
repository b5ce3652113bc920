//! Installing on Kubernetes nodes (issue #32). The manifests in deploy/ are checked against
//! Kubernetes' own schemas by a schema-aware validator (kubernetes-validate, installed by
//! `make setup`), which is shown to refuse a broken one. The deploy image (`make
//! deploy-image`) imports into a private containerd, and its installer, run from it with
//! `ctr run` and a scratch node root bound at /host, installs Cocoon there: the static shim
//! and helpers run, the node's config points at them, and a containerd started after the
//! install with the node's paths runs a pod with the installed shim, guest and helpers;
//! install twice is install once, and uninstall leaves the node root as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_tests::containerd::Containerd;
use cocoon_tests::{gate, Need};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The validator `make setup` installs (a Python venv), or `$COCOON_KUBERNETES_VALIDATE`.
fn validator() -> PathBuf {
    let p = std::env::var_os("COCOON_KUBERNETES_VALIDATE").map_or_else(
        || PathBuf::from("/usr/local/lib/cocoon/kubernetes-validate/bin/kubernetes-validate"),
        PathBuf::from,
    );
    assert!(p.is_file(), "{} is missing: run `make setup`", p.display());
    p
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(validator())
        .arg("--strict")
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let deploy = repo().join("deploy");
    let files: Vec<PathBuf> = [
        "rbac.yaml",
        "daemonset.yaml",
        "runtimeclass.yaml",
        "cleanup/daemonset.yaml",
    ]
    .iter()
    .map(|f| deploy.join(f))
    .collect();
    let (ok, text) = validate(&files);
    assert!(ok, "{text}");
    for kind in [
        "serviceaccount/cocoon-deploy",
        "clusterrole/cocoon-deploy",
        "clusterrolebinding/cocoon-deploy",
        "daemonset/cocoon-deploy",
        "runtimeclass/cocoon",
        "daemonset/cocoon-cleanup",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind}: {text}"
        );
    }
    // The validator is live: a misspelled field of the RuntimeClass is refused.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("rc.yaml");
    let rc = std::fs::read_to_string(deploy.join("runtimeclass.yaml")).unwrap();
    std::fs::write(&broken, rc.replace("podFixed:", "podFixd:")).unwrap();
    let (ok, text) = validate(&[broken]);
    assert!(!ok && text.contains("podFixd"), "{text}");

    // The kustomization applies exactly the install's files.
    let kustomization = std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap();
    let listed: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    assert_eq!(listed, ["rbac.yaml", "daemonset.yaml", "runtimeclass.yaml"]);
    // The RuntimeClass selects the label the installer sets; the DaemonSet sets it.
    assert!(
        rc.contains(&format!("{}: \"true\"", cocoon_deploy::label::LABEL)),
        "{rc}"
    );
    assert!(rc.contains("handler: cocoon"), "{rc}");
    let ds = std::fs::read_to_string(deploy.join("daemonset.yaml")).unwrap();
    assert!(
        ds.contains("\"--label-node\"") && ds.contains("hostPID: true"),
        "{ds}"
    );
}

/// Every entry under `root` with its kind, mode, owner, contents or target, and a file's
/// inode and mtime.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o} {}:{}", m.mode(), m.uid(), m.gid())
            } else {
                format!(
                    "file {:o} {}:{} ino {} mtime {}.{} {:?}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    std::fs::read(&p).unwrap()
                )
            };
            out.insert(p.strip_prefix(root).unwrap().to_owned(), what);
        }
    }
    out
}

/// `cocoon-deploy ARGS…` run from the image with runc, the node root at /host.
fn deploy(c: &Containerd, node: &Path, name: &str, args: &[&str]) -> String {
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        node.display()
    );
    let mut cmd = vec![
        "run",
        "--rm",
        "--mount",
        &mount,
        "localhost/cocoon-deploy:0.1.0",
        name,
        "/opt/cocoon-artifacts/bin/cocoon-deploy",
    ];
    cmd.extend_from_slice(args);
    let out = c.ctr(&cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cocoon-deploy {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A containerd started after the install, as the node runs it (`start_on_node`: the node's
/// paths in a mount namespace of its own), runs a pod with the installed shim, which boots
/// the installed guest with the installed helpers. The node's config gets a private
/// `state_dir` and `template_dir` for the run and its own bytes back after.
fn run_a_pod_on(node: &Path, scratch: &Path) {
    let config = node.join("etc/cocoon/config.toml");
    let shipped = std::fs::read(&config).unwrap();
    let state = scratch.join("state");
    // And a private template dir: a template is keyed by its kernel's inode, new with each
    // install, so one made here would be left behind in the host's.
    let text = String::from_utf8(shipped.clone())
        .unwrap()
        .replace(
            "state_dir = \"/run/cocoon\"",
            &format!("state_dir = \"{}\"", state.display()),
        )
        .replace(
            "template_dir = \"/var/lib/cocoon/templates\"",
            &format!("template_dir = \"{}\"", scratch.join("templates").display()),
        );
    assert!(
        text.contains(&scratch.display().to_string())
            && !text.contains("/var/lib/cocoon/templates")
    );
    std::fs::write(&config, text).unwrap();
    {
        let n = Containerd::start_on_node(node, &state);
        n.import_test_image();
        n.run_detached("on-node", &["sleep", "600"]);
        let shim = n.shim_pid("on-node");
        assert_eq!(
            std::fs::read_link(format!("/proc/{shim}/exe")).unwrap(),
            Path::new("/opt/cocoon/bin/containerd-shim-cocoon-v2"),
            "the pod's shim is the installed one"
        );
        let qemu = cocoon_tests::leaks::pids_named(&state, "qemu-system-x86_64");
        assert_eq!(qemu.len(), 1, "{qemu:?}");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", qemu[0])).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("/opt/cocoon/share/vmlinuz"), "{cmdline}");
        let out = n.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "on-node",
            "echo",
            "hello from the node",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello from the node",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        n.kill_and_remove("on-node");
        n.assert_clean();
    }
    std::fs::write(&config, shipped).unwrap();
}

#[tokio::test]
async fn the_deploy_image_installs_a_shim_that_runs_pods_and_uninstall_gives_the_node_back() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let image = repo().join("target/deploy/cocoon-deploy.oci.tar");
    assert!(
        image.is_file(),
        "{} is missing: run `make deploy-image`",
        image.display()
    );
    let c = Containerd::start();
    let out = c.ctr(&["images", "import", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A node: containerd, its config, the usual directories.
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    for d in ["usr/bin", "usr/local/bin", "etc/containerd", "opt", "run"] {
        std::fs::create_dir_all(node.join(d)).unwrap();
    }
    let containerd = which::which(cocoon_tests::containerd::containerd_bin("containerd")).unwrap();
    std::fs::copy(containerd, node.join("usr/bin/containerd")).unwrap();
    std::fs::write(
        node.join("etc/containerd/config.toml"),
        "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  # the node's own\n",
    )
    .unwrap();
    let before = snapshot(&node);

    let said = deploy(
        &c,
        &node,
        "deploy-1",
        &["install", "--host-root", "/host", "--no-restart"],
    );
    assert!(
        said.contains("wrote /opt/cocoon/bin/containerd-shim-cocoon-v2"),
        "{said}"
    );
    assert!(said.contains("applies at its next start"), "{said}");
    // What was installed runs here: static binaries, whatever the node's libraries.
    for (bin, arg) in [
        ("opt/cocoon/bin/containerd-shim-cocoon-v2", "--version"),
        ("opt/cocoon/bin/cocoon", "--version"),
        ("opt/cocoon/libexec/virtiofsd", "--version"),
        ("opt/cocoon/libexec/vhost-device-vsock", "--version"),
    ] {
        let out = Command::new(node.join(bin)).arg(arg).output().unwrap();
        assert!(
            out.status.success(),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ldd = Command::new("ldd").arg(node.join(bin)).output().unwrap();
        let said = String::from_utf8_lossy(&ldd.stdout) + String::from_utf8_lossy(&ldd.stderr);
        assert!(
            said.contains("statically linked") || said.contains("not a dynamic executable"),
            "{bin} is not static: {said}"
        );
    }
    let cfg = vmm_driver::Config::from_file(&node.join("etc/cocoon/config.toml")).unwrap();
    assert_eq!(cfg.kernel, Path::new("/opt/cocoon/share/vmlinuz"));
    assert_eq!(
        cfg.paths.virtiofsd,
        Path::new("/opt/cocoon/libexec/virtiofsd")
    );
    let host_image = cocoon_tests::test_config(dir.path()).initramfs;
    assert_eq!(
        std::fs::read(node.join("opt/cocoon/share/initramfs.img")).unwrap(),
        std::fs::read(host_image).unwrap(),
        "the image carries this build's guest"
    );
    assert_eq!(
        std::fs::read_link(node.join("usr/local/bin/containerd-shim-cocoon-v2")).unwrap(),
        Path::new("/opt/cocoon/bin/containerd-shim-cocoon-v2")
    );
    let config = std::fs::read_to_string(node.join("etc/containerd/config.toml")).unwrap();
    assert!(
        config.contains("imports = [\"/etc/containerd/conf.d/*.toml\"]")
            && config.contains("# the node's own"),
        "{config}"
    );
    assert!(node.join("etc/containerd/conf.d/cocoon.toml").is_file());

    let once = snapshot(&node);
    let said = deploy(
        &c,
        &node,
        "deploy-2",
        &["install", "--host-root", "/host", "--no-restart"],
    );
    assert!(
        said.contains("already installed; nothing changed"),
        "{said}"
    );
    assert_eq!(snapshot(&node), once, "a second install changed the node");

    run_a_pod_on(&node, dir.path());

    let said = deploy(
        &c,
        &node,
        "deploy-3",
        &["uninstall", "--host-root", "/host", "--no-restart"],
    );
    assert!(
        said.contains("restored /etc/containerd/config.toml"),
        "{said}"
    );
    assert_eq!(snapshot(&node), before, "uninstall left the node changed");
    let said = deploy(
        &c,
        &node,
        "deploy-4",
        &["uninstall", "--host-root", "/host", "--no-restart"],
    );
    assert!(said.contains("nothing to take away"), "{said}");

    // A node without containerd is refused, and left alone.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        bare.display()
    );
    let out = c.ctr(&[
        "run",
        "--rm",
        "--mount",
        &mount,
        "localhost/cocoon-deploy:0.1.0",
        "deploy-5",
        "/opt/cocoon-artifacts/bin/cocoon-deploy",
        "install",
        "--host-root",
        "/host",
        "--no-restart",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no containerd"), "{err}");
    assert_eq!(std::fs::read_dir(&bare).unwrap().count(), 0);
    c.assert_clean();
}
