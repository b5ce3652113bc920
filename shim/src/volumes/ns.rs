//! Volume binds live in virtiofsd's mount namespace, not the host's.
//!
//! Under runc a volume's bind (and the copies of the mounts below it) exist only in the
//! container's mount namespace, so on the host a mount below the volume's source can be
//! unmounted and its directory removed while the container runs: `rmdir` refuses only a mount
//! point of the caller's own namespace and detaches the copies elsewhere. Had the shim bound
//! the volume in the host namespace, that `rmdir` would fail with EBUSY as long as the pod
//! lives (critest's "should support non-recursive readonly mounts" does exactly this in its
//! clean-up, and so does any host tool that tidies a directory it once mounted on).
//!
//! So the bind is cloned in the host namespace, where its source is (`open_tree` with
//! `OPEN_TREE_CLONE`: a detached copy of the mounts, flags and peer group included), and moved
//! into the namespace of the pod's virtiofsd, the only process that serves it. `move_mount`
//! has to run inside that namespace and `setns` into a mount namespace needs a single-threaded
//! caller, which the shim is not: a short-lived helper (the shim's own binary, started with
//! [`HELPER_ARG`]) enters the namespace, gets the tree on its stdin and moves it in place.
//!
//! Taking the volume away needs no helper: removing its mount point on the host (a plain
//! directory or file there) detaches what is mounted on it in every other namespace. When the
//! pod goes, virtiofsd's namespace goes with it, and every volume with it.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The shim's first argument that makes it this module's helper (`helper_main`).
pub const HELPER_ARG: &str = "__cocoon-volume-into-ns";

/// What the helper prints once the volume is in place.
const PLACED: &str = "placed\n";

/// Where a volume goes: the mount namespace of the process `pid` (the pod's virtiofsd, whose
/// root is the exported tree), at `path` there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub pid: u32,
    pub path: PathBuf,
    /// The shim binary that runs the helper: the running one (`/proc/self/exe`, which still
    /// names it after an upgrade replaced the file) unless a test binary places a volume.
    pub helper: PathBuf,
}

impl Placement {
    pub fn new(pid: u32, path: PathBuf) -> Placement {
        Placement {
            pid,
            path,
            helper: PathBuf::from("/proc/self/exe"),
        }
    }
}

/// Clones the mount at `staged` (with the mounts below it if `recursive`) and moves the clone
/// to `at`. The clone keeps each mount's flags (`ro`, `nosuid`, `nodev`, `noexec`), so they are
/// set on the staged mount first. On failure nothing was placed.
pub fn place(staged: &Path, recursive: bool, at: &Placement) -> Result<()> {
    use rustix::mount::{open_tree, OpenTreeFlags};
    use std::io::Read;
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_SYMLINK_NOFOLLOW;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = open_tree(rustix::fs::CWD, staged, flags).map_err(|e| {
        Error::io(
            format!("clone the mounts at {}", staged.display()),
            e.into(),
        )
    })?;
    let mut child = std::process::Command::new(&at.helper)
        .arg(HELPER_ARG)
        .arg(format!("/proc/{}/ns/mnt", at.pid))
        .arg(&at.path)
        .stdin(std::process::Stdio::from(tree))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("start the volume helper", e))?;
    // The shim library reaps every child on SIGCHLD, so the helper's exit status may be gone
    // (ECHILD) before we ask: its word on stdout, written last, is what counts.
    let (mut said, mut why) = (String::new(), String::new());
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut said);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut why);
    }
    let _ = child.wait();
    if said == PLACED {
        return Ok(());
    }
    Err(Error::io(
        format!(
            "place {} in virtiofsd's mount namespace (pid {}) at {}",
            staged.display(),
            at.pid,
            at.path.display()
        ),
        std::io::Error::other(why.trim().to_owned()),
    ))
}

/// The helper: `<shim> __cocoon-volume-into-ns <ns file> <path>`, a detached mount tree on
/// stdin. Enters the namespace, moves the tree to `path` there and makes it a slave (mounts
/// made on the host below the source still reach the guest; nothing flows back). Must run
/// before any other thread starts.
pub fn helper_main(args: &[String]) -> Result<()> {
    use rustix::fs::{open, Mode, OFlags};
    use rustix::mount::{move_mount, MoveMountFlags};
    use std::os::fd::AsFd;
    let [ns, path] = args else {
        return Err(Error::io(
            "usage",
            std::io::Error::other(format!("{HELPER_ARG} <ns file> <path>")),
        ));
    };
    let io = |what: String| move |e: rustix::io::Errno| Error::io(what, e.into());
    let ns_file = std::fs::File::open(ns).map_err(|e| Error::io(format!("open {ns}"), e))?;
    nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::io(format!("enter {ns}"), e.into()))?;
    // The target is a fresh name the shim made in a tree the guest can't change, and still it
    // is opened without following a symlink: the move lands on exactly that name.
    let target = open(
        path.as_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io(format!("open {path}")))?;
    let stdin = std::io::stdin();
    move_mount(
        stdin.as_fd(),
        "",
        &target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(io(format!("move the volume to {path}")))?;
    let none: Option<&str> = None;
    nix::mount::mount(
        none,
        path.as_str(),
        none,
        nix::mount::MsFlags::MS_SLAVE | nix::mount::MsFlags::MS_REC,
        none,
    )
    .map_err(|e| Error::io(format!("make {path} a slave"), e.into()))?;
    use std::io::Write;
    std::io::stdout()
        .write_all(PLACED.as_bytes())
        .map_err(|e| Error::io("report", e))
}
