//! `cocoon-agent debug-exec [--tty] -- ARGS…`: the helper a debug console process starts as
//! (`containers/debug.rs`). It becomes the leader of a new session and, with `--tty`, takes
//! its stdin (the pty's slave side) as the session's controlling terminal, so that the shell
//! gets job control and ^C; then it replaces itself with the command. A process can only do
//! this to itself, and doing it here rather than in the agent keeps the agent's own session
//! and threads out of it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The argument that selects this helper.
pub const ARG: &str = "debug-exec";

/// Where the command is looked up, and the PATH it gets: busybox's applets are in /bin and
/// /sbin (`init.rs` installs them in a VM with the debug console).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The helper's entry point; returns only on failure, with the exit code to use.
pub fn main(args: &[String]) -> i32 {
    let (tty, argv) = match args {
        [flag, dashes, argv @ ..] if flag == "--tty" && dashes == "--" => (true, argv),
        [dashes, argv @ ..] if dashes == "--" => (false, argv),
        _ => {
            eprintln!("usage: cocoon-agent {ARG} [--tty] -- COMMAND [ARG…]");
            return 2;
        }
    };
    let Some(name) = argv.first() else {
        eprintln!("cocoon-agent {ARG}: no command");
        return 2;
    };
    if let Err(e) = nix::unistd::setsid() {
        eprintln!("cocoon-agent {ARG}: setsid: {e}");
        return 126;
    }
    if tty {
        if let Err(e) = rustix::process::ioctl_tiocsctty(std::io::stdin()) {
            eprintln!("cocoon-agent {ARG}: take the terminal: {e}");
            return 126;
        }
    }
    let Some(program) = lookup(name, PATH) else {
        eprintln!("{name}: command not found in the guest (PATH={PATH})");
        return 127;
    };
    let e = Command::new(&program)
        .arg0(name)
        .args(&argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("TERM", if tty { "xterm" } else { "dumb" })
        .current_dir("/")
        .exec();
    eprintln!("{name}: {e}");
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        126
    } else {
        127
    }
}

/// `name` itself if it holds a `/`, else the first executable file of that name on `path`.
fn lookup(name: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path.split(':').map(|d| Path::new(d).join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_on_the_path() {
        assert_eq!(lookup("/x/y", "/bin"), Some(PathBuf::from("/x/y")));
        assert!(lookup("sh", "/nonexistent:/bin").is_some());
        assert_eq!(lookup("no-such-command-here", "/bin:/usr/bin"), None);
    }
}
