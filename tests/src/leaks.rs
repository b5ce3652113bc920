//! Leak checks: once a VM or a pod is gone, nothing of it may be left: no process whose command
//! line names its directory, no file or directory under its state, no mount, no shim socket.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Processes whose command line mentions `needle` (a per-test temp dir) or whose working
/// directory is below it: anything listed after a VM stopped is a leak. The working directory
/// counts because vhost-device-vsock runs with relative socket paths in a directory of the
/// pod's run dir (`qemu/vsockd.rs`): its command line names no path at all.
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let text = needle.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            let cwd = std::fs::read_link(e.path().join("cwd")).ok();
            (cmd.contains(&text) || cwd.is_some_and(|d| d.starts_with(needle)))
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Pids of the processes whose command line mentions `needle` and contains `what`.
pub fn pids_mentioning(needle: &Path, what: &str) -> Vec<i32> {
    processes_mentioning(needle)
        .iter()
        .filter(|p| p.contains(what))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect()
}

/// The pids of processes mentioning `needle` whose name is `comm` (its first 15 bytes, as
/// /proc keeps it): a VM's QEMU by name, since QEMU's command line also mentions the helpers'
/// sockets.
pub fn pids_named(needle: &Path, comm: &str) -> Vec<i32> {
    let comm = &comm[..comm.len().min(15)];
    pids_mentioning(needle, "")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Sends `sig` to each of `pids`; one that is already gone is skipped (virtiofsd's sandboxed
/// child can die with its parent first).
pub fn signal_all(pids: &[i32], sig: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig);
    }
}

/// Everything left under `dir`, recursively: after a stop there must be nothing.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Asserts that nothing of a VM under `state` survives: no process, no file, no directory.
pub fn assert_no_leaks(state: &Path) {
    let procs = processes_mentioning(state);
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");
    let files = leftovers(state);
    assert!(files.is_empty(), "files left behind: {files:#?}");
}

/// Lines of this process's mount table that mention `needle`.
pub fn mounts_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Where the containerd-shim library puts shim sockets.
pub const SHIM_SOCKETS: &str = "/run/containerd/s";

/// The shim sockets that exist now: compare a set taken before a run with one taken after.
pub fn shim_sockets() -> BTreeSet<PathBuf> {
    entries(Path::new(SHIM_SOCKETS))
}

/// What `dir` holds now (nothing if it can't be read).
fn entries(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// The shim sockets in `dir` that are not in `before` and that nothing listens on: files a
/// dead shim left. A socket a process still serves belongs to a live shim. A live shim of the
/// containerd under test is already a leak the process check reports (its command line names
/// the test's directory); one of a test running beside it (a runc pod takes no VM turn) is
/// not this containerd's leak, and counting it made such a test fail at random.
pub fn dead_new_sockets(dir: &Path, before: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
    entries(dir)
        .difference(before)
        .filter(|p| std::os::unix::net::UnixStream::connect(p).is_err())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_lists_everything_under_a_dir_and_nothing_of_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(leftovers(dir.path()).is_empty());
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), "x").unwrap();
        let mut found = leftovers(dir.path());
        found.sort();
        assert_eq!(
            found,
            ["a", "a/b", "a/b/f"].map(|p| dir.path().join(p)),
            "every file and directory, recursively"
        );
    }

    #[test]
    fn a_process_naming_a_dir_is_found_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        std::fs::write(&marker, "").unwrap();
        let mut child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&marker)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still this test's: poll.
        let mut found = vec![];
        for _ in 0..200 {
            found = processes_mentioning(dir.path());
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(&format!("{}: ", child.id())),
            "{found:?}"
        );
        assert!(processes_mentioning(dir.path()).is_empty());
        assert!(mounts_mentioning(dir.path()).is_empty());
    }

    #[test]
    fn a_new_socket_counts_as_left_only_when_nothing_serves_it() {
        let dir = tempfile::tempdir().unwrap();
        // Dead but there before the run: not this run's.
        let old = dir.path().join("old");
        drop(std::os::unix::net::UnixListener::bind(&old).unwrap());
        let before = BTreeSet::from([old.clone()]);
        let live = dir.path().join("live");
        let _serving = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let dead = dir.path().join("dead");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        // A child another test forks at this moment holds a copy of the closed listener until
        // it execs (close-on-exec), and the socket still accepts meanwhile: poll briefly.
        let t0 = std::time::Instant::now();
        while dead_new_sockets(dir.path(), &before).is_empty()
            && t0.elapsed() < std::time::Duration::from_secs(2)
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(dead_new_sockets(dir.path(), &before), vec![dead.clone()]);
        std::fs::remove_file(&dead).unwrap();
        assert!(dead_new_sockets(dir.path(), &before).is_empty());
    }
}
