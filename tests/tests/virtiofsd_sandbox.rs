//! Root in the guest can send virtiofsd raw FUSE requests. virtiofsd hands the names in
//! MKDIR/SYMLINK/RENAME/UNLINK/LINK to the *at() calls unchecked, so without a sandbox an
//! absolute name or `..` acts on the host's own tree (Kata advisory GHSA-2gv2-cffp-j227, issue
//! #11 item 1). These tests play that guest: a raw vhost-user-fs frontend
//! (`cocoon_tests::fuse_client`) sends those requests to the real virtiofsd and checks that
//! `--sandbox=namespace` and its fallback `--sandbox=chroot` keep them inside the share, and
//! that the very same requests do escape with `--sandbox=none`, so these checks can fail.
//!
//! Everything lives in one temp dir per test: `share/` is exported, `outside/` is the host
//! tree the attacks aim at, and the absolute names point into `outside/`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_tests::fuse_client::{FsFrontend, Reply, FUSE_ROOT_ID};
use cocoon_tests::processes_mentioning;
use cocoon_tests::virtiofsd::{virtiofsd_bin, Virtiofsd};

const TIMEOUT: Duration = Duration::from_secs(10);
const VICTIM: &[u8] = b"host data the guest must not touch";

/// One request a hostile guest sends, and where it lands on the host if it escapes.
struct Attack {
    what: &'static str,
    /// The reply, or the transport error.
    reply: Result<Reply, String>,
    /// Whether the host shows the effect outside the share.
    escaped: bool,
    /// Where, inside the share, a confined virtiofsd may act on the name instead (`..` at the
    /// sandbox's root stays at the root); None: the name can only fail there.
    confined_to: Option<&'static str>,
}

/// What one run against one `--sandbox` mode saw.
struct Run {
    sandbox: &'static str,
    attacks: Vec<Attack>,
    /// `outside/` (recursively) and `<tmp>`'s own entries, before and after the attacks.
    host_before: BTreeMap<PathBuf, Vec<u8>>,
    host_after: BTreeMap<PathBuf, Vec<u8>>,
    /// Everything under `share/` after the attacks, relative to it.
    share_after: Vec<PathBuf>,
    elapsed: Duration,
}

/// Every path under `dir`, sorted, never following a symlink: a SYMLINK that escaped must not
/// lead the walk (or a read) out of the test's temp dir.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// Every entry under `outside/` with what it holds (a regular file: its bytes; a symlink: its
/// target), plus the names directly in `<tmp>` (a `..` from the share lands there), leaving
/// out the share itself and virtiofsd's own socket, pid file and log.
fn host_view(tmp: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut view = BTreeMap::new();
    for e in std::fs::read_dir(tmp).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "share" && !name.starts_with("vfs.sock") && name != "virtiofsd.log" {
            view.insert(e.path(), vec![]);
        }
    }
    for p in tree(&tmp.join("outside")) {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let content = if meta.is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        } else if meta.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            format!("<{:?}>", meta.file_type()).into_bytes()
        };
        view.insert(p, content);
    }
    view
}

fn relative_tree(dir: &Path) -> Vec<PathBuf> {
    tree(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_owned())
        .collect()
}

/// Starts virtiofsd with `--sandbox=<sandbox>` on a fresh share, proves the client works (a
/// plain MKDIR under the root appears in the share), sends every attack, then stops virtiofsd
/// and removes the temp dir, checking that neither leaves anything behind.
fn attack(bin: &Path, sandbox: &'static str) -> Run {
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (share, outside) = (tmp.path().join("share"), tmp.path().join("outside"));
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(share.join("movable"), "moved by RENAME").unwrap();
    std::fs::write(share.join("linkable"), "linked by LINK").unwrap();
    std::fs::write(outside.join("victim"), VICTIM).unwrap();
    let abs = |name: &str| outside.join(name).as_os_str().as_bytes().to_vec();

    let mut vfs = Virtiofsd::spawn(bin, tmp.path(), &share, sandbox).unwrap();
    vfs.wait_for_socket(TIMEOUT).unwrap();
    let mut fs = FsFrontend::connect(&vfs.socket, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect ({sandbox}): {e}; log: {}", vfs.log_text()));
    let (major, minor) = fs.init().unwrap();
    assert_eq!(major, 7, "FUSE major from virtiofsd");
    assert!(minor >= 27, "FUSE minor {minor}");

    // Positive control: the client can change the share, so an unchanged host means something.
    let inside = fs.mkdir(FUSE_ROOT_ID, b"inside", 0o755).unwrap();
    assert_eq!(
        inside.errno().map(|e| e.to_string()),
        None,
        "{sandbox}: MKDIR inside"
    );
    assert!(
        inside.nodeid().is_some(),
        "{sandbox}: MKDIR inside gave no entry"
    );
    assert!(
        share.join("inside").is_dir(),
        "{sandbox}: MKDIR inside is not in the share"
    );
    let movable = fs
        .lookup(FUSE_ROOT_ID, b"movable")
        .unwrap()
        .nodeid()
        .unwrap();
    let linkable = fs
        .lookup(FUSE_ROOT_ID, b"linkable")
        .unwrap()
        .nodeid()
        .unwrap();
    assert_ne!(movable, linkable);

    let host_before = host_view(tmp.path());
    let mut sent: Vec<(&'static str, Result<Reply, String>)> = vec![];
    let mut send =
        |what, r: std::io::Result<Reply>| sent.push((what, r.map_err(|e| e.to_string())));
    send(
        "MKDIR absolute",
        fs.mkdir(FUSE_ROOT_ID, &abs("abs-mkdir"), 0o755),
    );
    send(
        "MKDIR ../outside/…",
        fs.mkdir(FUSE_ROOT_ID, b"../outside/dotdot-mkdir", 0o755),
    );
    send(
        "MKDIR ../…",
        fs.mkdir(FUSE_ROOT_ID, b"../dotdot-top", 0o755),
    );
    send(
        "SYMLINK absolute",
        fs.symlink(FUSE_ROOT_ID, &abs("abs-symlink"), b"dangling"),
    );
    send(
        "RENAME to absolute",
        fs.rename(FUSE_ROOT_ID, b"movable", FUSE_ROOT_ID, &abs("abs-rename")),
    );
    send("UNLINK absolute", fs.unlink(FUSE_ROOT_ID, &abs("victim")));
    send(
        "LINK absolute",
        fs.link(linkable, FUSE_ROOT_ID, &abs("abs-link")),
    );
    fs.disconnect();
    let log = vfs.log_text();
    vfs.stop();
    assert_eq!(
        processes_mentioning(tmp.path()),
        Vec::<String>::new(),
        "virtiofsd left running"
    );

    let host_after = host_view(tmp.path());
    let o = |n: &str| outside.join(n);
    let landed = [
        (o("abs-mkdir").is_dir(), None),
        (o("dotdot-mkdir").is_dir(), None),
        (tmp.path().join("dotdot-top").is_dir(), Some("dotdot-top")),
        (o("abs-symlink").is_symlink(), None),
        (o("abs-rename").is_file(), None),
        (!o("victim").exists(), None),
        (o("abs-link").is_file(), None),
    ];
    assert_eq!(landed.len(), sent.len());
    let attacks = sent
        .into_iter()
        .zip(landed)
        .map(|((what, reply), (escaped, confined_to))| Attack {
            what,
            reply,
            escaped,
            confined_to,
        })
        .collect();
    let share_after = relative_tree(&share);
    let dir = tmp.path().to_owned();
    tmp.close().unwrap();
    assert!(!dir.exists(), "temp dir left behind");
    let run = Run {
        sandbox,
        attacks,
        host_before,
        host_after,
        share_after,
        elapsed: start.elapsed(),
    };
    report(&run, &log);
    run
}

fn report(run: &Run, log: &str) {
    println!("--sandbox={} ({:.2?}):", run.sandbox, run.elapsed);
    for a in &run.attacks {
        let reply = match &a.reply {
            Ok(r) => r.errno().map_or("ok".into(), |e| e.to_string()),
            Err(e) => format!("transport error: {e}"),
        };
        let effect = if a.escaped {
            "ESCAPED to the host"
        } else {
            "host unchanged"
        };
        println!("  {:<20} -> {reply}; {effect}", a.what);
    }
    if log.contains("ERROR") {
        println!("  virtiofsd log:\n{log}");
    }
}

/// With a sandbox on, nothing outside the share changed, and every attack was refused or
/// acted only inside the share (where it says it may).
fn assert_contained(sandbox: &'static str) {
    let bin = virtiofsd_bin();
    let run = attack(&bin, sandbox);
    let mut share = vec!["inside", "linkable", "movable"];
    for a in &run.attacks {
        let reply = a
            .reply
            .as_ref()
            .unwrap_or_else(|e| panic!("{sandbox}: {}: {e}", a.what));
        assert!(
            !a.escaped,
            "--sandbox={sandbox}: {} escaped the share",
            a.what
        );
        if reply.error == 0 {
            let inside = a.confined_to.unwrap_or_else(|| {
                panic!("--sandbox={sandbox}: {} was accepted: {reply:?}", a.what)
            });
            share.push(inside);
        }
    }
    assert_eq!(
        run.host_after, run.host_before,
        "--sandbox={sandbox} let the host tree change"
    );
    share.sort();
    let share: Vec<PathBuf> = share.into_iter().map(PathBuf::from).collect();
    assert_eq!(
        run.share_after, share,
        "--sandbox={sandbox}: the share holds more than the control and the confined attacks"
    );
}

#[test]
fn namespace_sandbox_keeps_absolute_and_dotdot_names_inside_the_share() {
    assert_contained("namespace");
}

#[test]
fn chroot_sandbox_keeps_absolute_and_dotdot_names_inside_the_share() {
    assert_contained("chroot");
}

/// The proof that the checks above can fail: without a sandbox the same requests do reach the
/// host tree, and every one of them shows up in the checks.
#[test]
fn without_a_sandbox_the_same_requests_escape_so_the_checks_can_fail() {
    let bin = virtiofsd_bin();
    let run = attack(&bin, "none");
    let first = &run.attacks[0];
    assert_eq!(first.what, "MKDIR absolute");
    assert!(
        first.escaped,
        "--sandbox=none: MKDIR with an absolute name did not reach the host"
    );
    for a in &run.attacks {
        assert!(
            a.escaped,
            "--sandbox=none: {} did not reach the host: {:?}",
            a.what, a.reply
        );
    }
    assert_ne!(run.host_after, run.host_before);
}
