//! A private containerd (own root, state and socket in a temp dir) and a locally built OCI
//! image, for end-to-end tests through `ctr`. No registry is involved.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use vmm_driver::config::Hypervisor;

use crate::config::{test_hypervisor, write_cocoon_toml};
use crate::leaks::{
    dead_new_sockets, leftovers, mounts_mentioning, processes_mentioning, shim_sockets,
    SHIM_SOCKETS,
};
use crate::oci::busybox_rootfs;
use crate::paths::shim_dir;

/// The test image's name after `ctr images import`.
pub const IMAGE: &str = "docker.io/library/cocoon-test:latest";
pub const RUNTIME: &str = "io.containerd.cocoon.v2";

/// `ctr run --mount`'s value binding host path `src` at `dst` with `opts`
/// (`rbind:ro`, `rbind:rw`, …).
pub fn bind_mount(src: &Path, dst: &str, opts: &str) -> String {
    format!("type=bind,src={},dst={dst},options={opts}", src.display())
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A one-layer OCI image layout tarball: busybox-static with every applet linked into /bin.
pub fn build_image(out: &Path) {
    build_named_image(out, IMAGE, &["sh"]);
}

/// [`build_image`] under another name and default command (e.g. a pause image for CRI pods).
pub fn build_named_image(out: &Path, name: &str, cmd: &[&str]) {
    build_archive(out, name, cmd, None);
}

/// The test image as `docker load` takes it: the OCI layout plus Docker's `manifest.json`,
/// tagged `tag`.
pub fn build_docker_image(out: &Path, tag: &str) {
    build_archive(out, IMAGE, &["sh"], Some(tag));
}

fn build_archive(out: &Path, name: &str, cmd: &[&str], docker_tag: Option<&str>) {
    let root = tempfile::tempdir().unwrap();
    busybox_rootfs(root.path());
    let config = json!({"Env": [DEFAULT_PATH], "Cmd": cmd, "WorkingDir": "/"});
    write_image_layout(out, name, root.path(), config, docker_tag);
}

/// The `PATH` Docker's images default to.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Writes `root` as a one-layer OCI image layout tarball named `name`, with `config` as the
/// image config's `config` object (Cmd, Env, User, ExposedPorts, ...); with `docker_tag`, also
/// Docker's `manifest.json`, for `docker load`.
pub fn write_image_layout(
    out: &Path,
    name: &str,
    root: &Path,
    config: serde_json::Value,
    docker_tag: Option<&str>,
) {
    let mut layer = tar::Builder::new(Vec::new());
    layer.follow_symlinks(false);
    layer.append_dir_all(".", root).unwrap();
    let layer = layer.into_inner().unwrap();
    write_layered_image(out, name, &[layer], config, docker_tag);
}

/// Writes an OCI image layout tarball of `layers` (uncompressed layer tars, bottom first),
/// as [`write_image_layout`] does for one.
pub fn write_layered_image(
    out: &Path,
    name: &str,
    layers: &[Vec<u8>],
    config: serde_json::Value,
    docker_tag: Option<&str>,
) {
    let digests: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256(l)))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": digests}
    }))
    .unwrap();
    let descriptors: Vec<serde_json::Value> = layers
        .iter()
        .zip(&digests)
        .map(|(l, d)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()}))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256(&config)), "size": config.len()},
        "layers": descriptors
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256(&manifest)),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"}
        }]
    }))
    .unwrap();
    let mut t = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for blob in layers.iter().chain([&config, &manifest]) {
        add(&format!("blobs/sha256/{}", sha256(blob)), blob);
    }
    if let Some(tag) = docker_tag {
        let docker = serde_json::to_vec(&json!([{
            "Config": format!("blobs/sha256/{}", sha256(&config)),
            "RepoTags": [tag],
            "Layers": layers.iter().map(|l| format!("blobs/sha256/{}", sha256(l))).collect::<Vec<_>>(),
        }]))
        .unwrap();
        add("manifest.json", &docker);
    }
    t.finish().unwrap();
}

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub address: PathBuf,
    /// The Cocoon config the shims read (COCOON_CONFIG).
    pub cocoon_config: PathBuf,
    /// Cocoon's state_dir for this instance.
    pub cocoon_state: PathBuf,
    /// Shim sockets that existed before this instance started (other runs' leftovers).
    sockets_before: BTreeSet<PathBuf>,
    child: Child,
    /// The config file and PATH the daemon runs with, to start it again ([`Self::restart`]).
    cfg: PathBuf,
    path_env: String,
    /// A command the daemon runs under (`start_on_node`'s mount namespace); empty: none.
    wrapper: Vec<String>,
}

/// The directory of the `containerd` and `ctr` under test: `COCOON_TEST_CONTAINERD_BIN`
/// (e.g. a fetched containerd 2.x, `scripts/fetch-containerd.sh`), else PATH's.
pub fn containerd_bin(name: &str) -> PathBuf {
    match std::env::var_os("COCOON_TEST_CONTAINERD_BIN") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join(name),
        _ => PathBuf::from(name),
    }
}

/// Starts the daemon with `cfg`, logging to `log` (appended: a restart keeps the first log).
/// Under `wrapper` (a command that execs its arguments) where it is not empty; the shims get
/// `cocoon_config` as COCOON_CONFIG unless it is empty (they read the host's own then).
fn spawn_containerd(
    cfg: &Path,
    path_env: &str,
    cocoon_config: &Path,
    log: &Path,
    wrapper: &[String],
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let containerd = containerd_bin("containerd");
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest)
                .arg(which::which(&containerd).unwrap_or(containerd));
            c
        }
        None => Command::new(containerd),
    };
    if !cocoon_config.as_os_str().is_empty() {
        cmd.env("COCOON_CONFIG", cocoon_config);
    } else {
        cmd.env_remove("COCOON_CONFIG");
    }
    cmd.arg("--config")
        .arg(cfg)
        .env("PATH", path_env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("containerd is missing: run `make setup`")
}

/// A containerd config of its own in `d` (root, state, sockets), with `extra` after the
/// top-level keys and before `[grpc]`; its socket and the config's path.
fn private_config(d: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let address = d.join("containerd.sock");
    let cfg = d.join("containerd.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{extra}\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = address.display(),
        ),
    )
    .unwrap();
    (address, cfg)
}

impl Containerd {
    /// A containerd whose Cocoon shims use the hypervisor [`test_hypervisor`] selects.
    pub fn start() -> Containerd {
        Containerd::start_with(test_hypervisor())
    }

    pub fn start_with(hypervisor: Hypervisor) -> Containerd {
        Containerd::start_configured(hypervisor, |_| {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_owned()
        })
    }

    /// A containerd whose config gets the TOML `extra` returns for its temp dir, after the
    /// top-level keys and before `[grpc]`.
    pub fn start_configured(
        hypervisor: Hypervisor,
        extra: impl FnOnce(&Path) -> String,
    ) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (address, cfg) = private_config(d, &extra(d));
        let cocoon_state = d.join("cocoon");
        let cocoon_config = d.join("cocoon.toml");
        write_cocoon_toml(&cocoon_config, hypervisor, &cocoon_state);
        // The containerd under test finds its own runc shim first.
        let release = containerd_bin("containerd")
            .parent()
            .map(|d| format!("{}:", d.display()))
            .filter(|d| d != ":")
            .unwrap_or_default();
        let path = format!(
            "{}:{release}{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = spawn_containerd(&cfg, &path, &cocoon_config, &d.join("containerd.log"), &[]);
        let c = Containerd {
            dir,
            address,
            cocoon_config,
            cocoon_state,
            sockets_before: shim_sockets(),
            child,
            cfg,
            path_env: path,
            wrapper: vec![],
        };
        c.wait_serving();
        c
    }

    /// A containerd as a node with Cocoon installed under `node` would run it (issue #32):
    /// in a mount namespace of its own where `node`'s `/opt/cocoon`, `/etc/cocoon`,
    /// `/etc/containerd/conf.d` and `/usr/local/bin` stand at those paths, with a system PATH
    /// and no COCOON_CONFIG, so its shims are the node's and read the node's config. Its
    /// config is a private one (root, state, sockets) that imports the node's drop-ins.
    /// `cocoon_state` is the `state_dir` of the node's config.
    pub fn start_on_node(node: &Path, cocoon_state: &Path) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (address, cfg) = private_config(d, "imports = [\"/etc/containerd/conf.d/*.toml\"]");
        // /opt gets a tmpfs first: the mount point for /opt/cocoon must not be made on the
        // host's /opt.
        let script = d.join("node-ns.sh");
        std::fs::write(
            &script,
            format!(
                "set -eu\nN={node}\nmount -t tmpfs -o mode=0755 node-opt /opt\n\
                 mkdir /opt/cocoon\nmount --rbind \"$N/opt/cocoon\" /opt/cocoon\n\
                 for p in /etc/cocoon /etc/containerd/conf.d /usr/local/bin; do\n\
                 \x20 [ -d \"$p\" ] || {{ echo \"$p is missing on this host: run make setup\" >&2; exit 1; }}\n\
                 \x20 mount --rbind \"$N$p\" \"$p\"\ndone\nexec \"$@\"\n",
                node = node.display()
            ),
        )
        .unwrap();
        let wrapper: Vec<String> = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            script.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        let path = format!(
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin{}",
            containerd_bin("containerd")
                .parent()
                .map(|p| format!(":{}", p.display()))
                .filter(|p| p != ":")
                .unwrap_or_default()
        );
        let none = PathBuf::new();
        let child = spawn_containerd(&cfg, &path, &none, &d.join("containerd.log"), &wrapper);
        let c = Containerd {
            dir,
            address,
            cocoon_config: none,
            cocoon_state: cocoon_state.to_owned(),
            sockets_before: shim_sockets(),
            child,
            cfg,
            path_env: path,
            wrapper,
        };
        c.wait_serving();
        c
    }

    fn wait_serving(&self) {
        let t0 = Instant::now();
        while !self.ctr(&["version"]).status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the daemon as an upgrade or a service restart does (SIGTERM), leaving its shims
    /// running; [`Self::start_again`] brings it back on the same root, state and sockets.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// Starts the daemon again after [`Self::stop`] and waits until it serves.
    pub fn start_again(&mut self) {
        self.child = spawn_containerd(
            &self.cfg,
            &self.path_env,
            &self.cocoon_config,
            &self.dir.path().join("containerd.log"),
            &self.wrapper,
        );
        self.wait_serving();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this instance.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Self::ctr_at(&self.address, args)
    }

    /// `ctr` against the containerd at `address`, for a thread that can't borrow `self`.
    pub fn ctr_at(address: &Path, args: &[&str]) -> Output {
        Command::new(containerd_bin("ctr"))
            .arg("--address")
            .arg(address)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `ctr` with `input` on its stdin.
    pub fn ctr_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(containerd_bin("ctr"))
            .arg("--address")
            .arg(&self.address)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    /// `ctr run -d` of the test image as `id`, running `cmd` under Cocoon; fails the test
    /// with ctr's error and containerd's log if the run does.
    pub fn run_detached(&self, id: &str, cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(cmd);
        let out = self.ctr(&args);
        assert!(
            out.status.success(),
            "ctr run -d {id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The pid of the one shim serving container `id` (its daemon, started with `-id <id>`).
    pub fn shim_pid(&self, id: &str) -> i32 {
        let flag = format!("-id {id} ");
        let shims: Vec<i32> = crate::processes_mentioning(self.dir.path())
            .iter()
            .filter(|p| p.contains("containerd-shim-cocoon-v2") && p.contains(&flag))
            .filter_map(|p| p.split(':').next()?.parse().ok())
            .collect();
        assert_eq!(shims.len(), 1, "one shim for {id}: {shims:?}");
        shims[0]
    }

    /// Nothing of any pod may be left: no shim, VM process, mount or runtime directory.
    pub fn assert_clean(&self) {
        let t0 = Instant::now();
        let me = format!("{}:", self.child.id());
        let others = || -> Vec<String> {
            processes_mentioning(self.dir.path())
                .into_iter()
                .filter(|p| !p.starts_with(&me))
                .collect()
        };
        // The shim exits right after answering containerd's Shutdown; give it a moment.
        while t0.elapsed() < Duration::from_secs(10) && !others().is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let procs = others();
        assert!(
            procs.is_empty(),
            "processes left behind: {procs:#?}\ncontainerd log:\n{}",
            self.log()
        );
        let mounts = mounts_mentioning(&self.cocoon_state);
        assert!(
            mounts.is_empty(),
            "mounts left under {}: {mounts:#?}",
            self.cocoon_state.display()
        );
        let files = leftovers(&self.cocoon_state);
        assert!(files.is_empty(), "files left behind: {files:#?}");
        // A shim that is just going away has closed its listener a moment before it unlinks
        // the socket file.
        let dead = || dead_new_sockets(Path::new(SHIM_SOCKETS), &self.sockets_before);
        while t0.elapsed() < Duration::from_secs(15) && !dead().is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let sockets = dead();
        assert!(
            sockets.is_empty(),
            "shim sockets left in {SHIM_SOCKETS}: {sockets:#?}\ncontainerd log:\n{}",
            self.log()
        );
    }

    /// Kills task `id` (SIGKILL), waits until it is stopped, and deletes the task and the
    /// container, each step asserted.
    pub fn kill_and_remove(&self, id: &str) {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let out = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(out.status.success(), "kill: {}", text(&out.stderr));
        let t0 = Instant::now();
        while !text(&self.ctr(&["task", "ls"]).stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"))
        {
            assert!(t0.elapsed() < Duration::from_secs(30), "task never stopped");
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = self.ctr(&["task", "delete", id]);
        assert!(out.status.success(), "task delete: {}", text(&out.stderr));
        let out = self.ctr(&["containers", "rm", id]);
        assert!(out.status.success(), "rm: {}", text(&out.stderr));
    }

    /// Imports the locally built test image.
    pub fn import_test_image(&self) {
        self.import_image("default", IMAGE, &["sh"]);
    }

    /// Imports a locally built busybox image named `name` into containerd namespace `ns`.
    pub fn import_image(&self, ns: &str, name: &str, cmd: &[&str]) {
        let tarball = self.dir.path().join("image.tar");
        build_named_image(&tarball, name, cmd);
        let out = self.ctr(&["-n", ns, "images", "import", tarball.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // A test that failed half-way leaves pods running: their shims tear them down on
        // SIGTERM; whatever still names this directory after that is killed, so one failed
        // test doesn't leave VMs behind for the next.
        let signal_all = |sig| {
            for pid in crate::leaks::pids_mentioning(self.dir.path(), "") {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        };
        if !crate::leaks::pids_mentioning(self.dir.path(), "containerd-shim").is_empty() {
            for pid in crate::leaks::pids_mentioning(self.dir.path(), "containerd-shim") {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_secs(15)
                && !crate::leaks::pids_mentioning(self.dir.path(), "").is_empty()
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        signal_all(nix::sys::signal::Signal::SIGKILL);
        // Snapshots stay mounted under root/ if a test failed half-way; don't leave them.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for mp in mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
        {
            let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
