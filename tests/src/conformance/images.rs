//! The offline stand-ins for the images critest pulls, built here from busybox-static, small
//! static C programs and Debian's own nginx, and pushed to a local registry under the names
//! critest asks for. What each spec looks at decides what each image must hold (cri-tools
//! `pkg/validate`): the user images' `USER`, distinct or shared image ids, a web server on
//! port 80 (12003 for the host-network one) that writes `/var/run/nginx.pid`, a log line with
//! "httpd", a setuid program that prints "Effective uid: N".

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::containerd::{write_image_layout, DEFAULT_PATH};
use crate::oci::{busybox_rootfs, static_c};

const E2E: &str = "registry.k8s.io/e2e-test-images/";
const CRI_TOOLS: &str = "gcr.io/k8s-staging-cri-tools/";

/// One image: the references that name it (all resolve to the same manifest) and the
/// layout tarball it was written to.
#[derive(Debug)]
pub struct TestImage {
    pub refs: Vec<String>,
    pub layout: PathBuf,
}

/// Debian packages of this release unpacked below `root` by `scripts/conformance.sh` (nginx,
/// procps): a program is taken from there, else from this system, with the shared libraries
/// `ldd` finds for it.
#[derive(Debug, Clone)]
pub struct Parts {
    pub root: PathBuf,
}

/// Builds every image into `dir`.
pub fn build_all(dir: &Path, parts: &Parts) -> Vec<TestImage> {
    let mut images = Vec::new();
    let mut add = |refs: &[String], root: &Path, config: Value| {
        let layout = dir.join(format!("image-{}.tar", images.len()));
        write_image_layout(&layout, &refs[0], root, config, None);
        images.push(TestImage {
            refs: refs.to_vec(),
            layout,
        });
    };
    let sh = json!({"Env": [DEFAULT_PATH], "Cmd": ["sh"]});

    let base = rootfs(|r| {
        // What the specs run that busybox-static lacks: `pgrep` (an execSync timeout must
        // leave no process) and `ipcs` (host IPC).
        for tool in ["usr/bin/pgrep", "usr/bin/ipcs"] {
            copy_program(r, parts, tool);
        }
    });
    add(&[format!("{E2E}busybox:1.29-2")], base.path(), sh.clone());

    let pause = rootfs(|r| static_c(&r.join("pause"), PAUSE_C, 0o755));
    add(
        &[
            "registry.k8s.io/pause:3.9".to_owned(),
            "k8s.gcr.io/pause:3.9".to_owned(),
        ],
        pause.path(),
        json!({"Env": [DEFAULT_PATH], "Entrypoint": ["/pause"]}),
    );

    let web = rootfs(|r| nginx_root(r, parts, 80));
    let nginx_cmd = json!({"Env": [DEFAULT_PATH], "Cmd": ["/usr/sbin/nginx"],
                           "ExposedPorts": {"80/tcp": {}}});
    add(&[format!("{E2E}nginx:1.14-2")], web.path(), nginx_cmd);
    let hostnet = rootfs(|r| nginx_root(r, parts, 12003));
    add(
        &[format!("{CRI_TOOLS}hostnet-nginx-amd64:latest")],
        hostnet.path(),
        json!({"Env": [DEFAULT_PATH], "Cmd": ["/usr/sbin/nginx"],
               "ExposedPorts": {"12003/tcp": {}}}),
    );

    // httpd's own first line names it ("AH00558: httpd: Could not reliably determine..."),
    // which is what the multi-container spec waits for; busybox's httpd says nothing.
    let httpd = rootfs(|r| {
        std::fs::create_dir_all(r.join("var/www")).unwrap();
        std::fs::write(r.join("var/www/index.html"), "<html>It works!</html>\n").unwrap();
    });
    add(
        &[format!("{E2E}httpd:2.4.39-4")],
        httpd.path(),
        json!({"Env": [DEFAULT_PATH], "ExposedPorts": {"80/tcp": {}},
               "Cmd": ["sh", "-c", "echo 'httpd: serving /var/www on :80' >&2; exec httpd -f -p 80 -h /var/www"]}),
    );

    let nnp = rootfs(|r| {
        std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
        static_c(&r.join("usr/local/bin/nnp"), NNP_C, 0o4755);
    });
    add(
        &[format!("{E2E}nonewprivs:1.3")],
        nnp.path(),
        json!({"Env": [DEFAULT_PATH], "Cmd": ["/usr/local/bin/nnp"]}),
    );

    for (name, user) in [
        ("user-uid", "1002"),
        ("user-username", "www-data"),
        ("user-uid-group", "1003:1004"),
        ("user-username-group", "www-data:1004"),
    ] {
        let mut config = sh.clone();
        config["User"] = json!(user);
        add(
            &[format!("{CRI_TOOLS}test-image-{name}:latest")],
            base.path(),
            config,
        );
    }
    let group = rootfs(|r| {
        append(
            r,
            "etc/passwd",
            "default-user:x:1000:1000::/home/default-user:/bin/sh\n",
        );
        append(
            r,
            "etc/group",
            "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n",
        );
    });
    let mut config = sh.clone();
    config["User"] = json!("1000");
    add(
        &[format!("{CRI_TOOLS}test-image-predefined-group:latest")],
        group.path(),
        config,
    );

    // Distinct images carry a file of their own name (cri-tools' image-test does the same).
    for name in [
        "latest:latest",
        "tag:test",
        "tag:all",
        "1:latest",
        "2:latest",
        "3:latest",
    ] {
        let marked = rootfs(|r| std::fs::write(r.join(name.replace(':', "-")), name).unwrap());
        add(
            &[format!("{CRI_TOOLS}test-image-{name}")],
            marked.path(),
            sh.clone(),
        );
    }
    // One image under three tags, and no other image's id (listImage counts its tags).
    let tags: Vec<String> = (1..=3)
        .map(|n| format!("{CRI_TOOLS}test-image-tags:{n}"))
        .collect();
    let tagged = rootfs(|r| std::fs::write(r.join("tags"), "tags").unwrap());
    add(&tags, tagged.path(), sh);
    images
}

/// A busybox root with the users the images refer to, then `extra`.
fn rootfs(extra: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    busybox_rootfs(r);
    // busybox's image links its applets hard, so masking one (`MaskedPaths: ["/bin/ls"]`)
    // masks that one; through our symlink it would mask busybox itself, `sh` included.
    let ls = r.join("bin/ls");
    std::fs::remove_file(&ls).unwrap();
    std::fs::copy(r.join("bin/busybox"), &ls).unwrap();
    append(
        r,
        "etc/passwd",
        "www-data:x:33:33:www-data:/var/www:/bin/sh\n",
    );
    append(r, "etc/group", "www-data:x:33:\n");
    extra(r);
    dir
}

fn append(root: &Path, file: &str, text: &str) {
    let path = root.join(file);
    let mut s = std::fs::read_to_string(&path).unwrap_or_default();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

/// Copies the program `rel` (a path below `/`) from `parts`, else from this system, into
/// the root `r` at the same path, with the shared libraries `ldd` finds for it.
fn copy_program(r: &Path, parts: &Parts, rel: &str) {
    let bin = [parts.root.join(rel), Path::new("/").join(rel)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{rel}: neither in {} nor here", parts.root.display()));
    copy_into(r, &bin, &Path::new("/").join(rel));
    let libs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
        .map(|d| parts.root.join(d).display().to_string())
        .join(":");
    let ldd = std::process::Command::new("ldd")
        .arg(&bin)
        .env("LD_LIBRARY_PATH", libs)
        .output()
        .unwrap();
    assert!(ldd.status.success(), "ldd {}", bin.display());
    let text = String::from_utf8_lossy(&ldd.stdout);
    assert!(!text.contains("not found"), "ldd {}: {text}", bin.display());
    for lib in text.split_whitespace().filter(|w| w.starts_with('/')) {
        // Where the program will look: the standard directory, whichever prefix it came from.
        let at = Path::new(lib)
            .strip_prefix(&parts.root)
            .map_or_else(|_| PathBuf::from(lib), |p| Path::new("/").join(p));
        copy_into(r, &std::fs::canonicalize(lib).unwrap(), &at);
    }
}

/// Debian's nginx, a config of our own (foreground, pid file where the spec reads it, logs to
/// the container's stdout/stderr) and a page to serve.
fn nginx_root(r: &Path, parts: &Parts, port: u16) {
    copy_program(r, parts, "usr/sbin/nginx");
    for d in [
        "etc/nginx",
        "var/run",
        "var/log/nginx",
        "var/lib/nginx/body",
        "usr/share/nginx/html",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(
        r.join("etc/nginx/nginx.conf"),
        format!(
            "user www-data;\nworker_processes 1;\npid /var/run/nginx.pid;\n\
             error_log stderr notice;\ndaemon off;\nevents {{}}\n\
             http {{\n  access_log /dev/stdout;\n  server {{\n    listen {port};\n    \
             root /usr/share/nginx/html;\n  }}\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        r.join("usr/share/nginx/html/index.html"),
        "<html><body><h1>Welcome to nginx!</h1></body></html>\n",
    )
    .unwrap();
}

/// Copies `src` to `dest` (an absolute path) inside `root`, keeping its mode.
fn copy_into(root: &Path, src: &Path, dest: &Path) {
    let to = root.join(dest.strip_prefix("/").unwrap());
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(src, &to).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// Kubernetes' pause in a few lines: sleeps until SIGINT or SIGTERM, reaping orphans.
const PAUSE_C: &str = r#"#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int s) { (void)s; exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
"#;

/// The e2e image `nonewprivs`: installed setuid root, it prints the uid it runs with.
const NNP_C: &str = r#"#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
"#;
