//! A registry on loopback that serves the offline image set under the upstream names, so the
//! image specs pull, remove and compare references exactly as against the real registries.
//! Debian's `docker-registry` (the CNCF distribution registry) serves it; containerd reaches
//! it through `hosts.toml` mirrors for registry.k8s.io, k8s.gcr.io and gcr.io, so nothing
//! leaves the machine.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::TestImage;
use crate::containerd::Containerd;

/// The registries critest names, each mirrored to the local one.
pub const MIRRORED: &[&str] = &["registry.k8s.io", "k8s.gcr.io", "gcr.io"];

/// A running `docker-registry serve`, killed on drop.
#[derive(Debug)]
pub struct Registry {
    pub addr: String,
    child: Child,
    /// Holds the config, log and blobs; removed on drop.
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts `bin` on a free loopback port, storing blobs in a temp dir.
    pub fn start(bin: &Path) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the registry did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Registry {
            addr,
            child,
            _dir: dir,
        }
    }

    /// Writes containerd's `hosts.toml` for every mirrored registry into `certs_d` (the CRI
    /// registry's `config_path`).
    pub fn write_hosts(&self, certs_d: &Path) {
        for host in MIRRORED {
            let d = certs_d.join(host);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("hosts.toml"),
                format!(
                    "server = \"https://{host}\"\n\n[host.\"http://{}\"]\n  \
                     capabilities = [\"pull\", \"resolve\"]\n",
                    self.addr
                ),
            )
            .unwrap();
        }
    }

    /// Imports each image into a scratch namespace of `containerd` and pushes every one of
    /// its references to this registry (`registry.k8s.io/pause:3.9` as `<addr>/pause:3.9`),
    /// then drops the scratch copies.
    pub fn push_all(&self, containerd: &Containerd, images: &[TestImage]) {
        const NS: &str = "conformance-build";
        let mut pushed = std::collections::BTreeSet::new();
        for image in images {
            let layout = image.layout.to_str().unwrap();
            ok(
                containerd.ctr(&["-n", NS, "images", "import", layout]),
                layout,
            );
            for r in &image.refs {
                let local = self.local_ref(r);
                if !pushed.insert(local.clone()) {
                    continue; // one registry behind several names
                }
                if *r != image.refs[0] {
                    ok(
                        containerd.ctr(&["-n", NS, "images", "tag", &image.refs[0], r]),
                        r,
                    );
                }
                ok(
                    containerd.ctr(&["-n", NS, "images", "tag", r, &local]),
                    &local,
                );
                ok(
                    containerd.ctr(&["-n", NS, "images", "push", "--plain-http", &local, &local]),
                    &local,
                );
            }
        }
        let list = containerd.ctr(&["-n", NS, "images", "ls", "-q"]);
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            let _ = containerd.ctr(&["-n", NS, "images", "rm", name]);
        }
    }

    /// `registry.k8s.io/e2e-test-images/busybox:1.29-2` → `<addr>/e2e-test-images/busybox:1.29-2`.
    pub fn local_ref(&self, reference: &str) -> String {
        let path = reference.split_once('/').map_or(reference, |(_, p)| p);
        format!("{}/{path}", self.addr)
    }
}

fn ok(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "ctr ({what}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
