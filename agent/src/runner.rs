//! `cocoon-agent runner create|exec …`: the short-lived helper that calls libcontainer.
//!
//! libcontainer forks with a raw `clone3` inside the calling process; doing that from the
//! agent, with its runtime and other threads, risks deadlocks in the child (glibc's fork
//! handlers do not run for a raw clone). So, like runc, the agent re-executes itself as a
//! single-threaded helper for the forking steps. The helper's own stdin/stdout/stderr are the
//! process's stdio, which libcontainer passes on; the result (pid or error) goes to a file.
//! When the helper exits, the container process is reparented to the agent, which reaps it.

use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;

use crate::exec_seccomp::SeccompExecutor;
use crate::propagation;

/// Where libcontainer keeps container state in the guest.
pub const STATE_ROOT: &str = "/run/cocoon/containers";

/// What the agent asks of the helper.
#[derive(Debug, PartialEq, Eq)]
pub enum Job {
    /// Create the container from a bundle; its init waits for `start`.
    Create { id: String, bundle: PathBuf },
    /// Start a new process (an OCI process.json) in a running container.
    Exec { id: String, process: PathBuf },
}

/// The helper's command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    pub job: Job,
    pub result: PathBuf,
    pub console_socket: Option<PathBuf>,
}

impl Invocation {
    /// Arguments after the binary, starting with `runner`.
    pub fn to_args(&self) -> Vec<String> {
        let (verb, id, path) = match &self.job {
            Job::Create { id, bundle } => ("create", id, bundle),
            Job::Exec { id, process } => ("exec", id, process),
        };
        let mut a = vec![
            "runner".into(),
            verb.into(),
            id.clone(),
            path.display().to_string(),
        ];
        a.extend(["--result".into(), self.result.display().to_string()]);
        if let Some(cs) = &self.console_socket {
            a.extend(["--console-socket".into(), cs.display().to_string()]);
        }
        a
    }

    /// Parses the arguments after `runner`.
    pub fn parse(args: &[String]) -> Result<Invocation, String> {
        let [verb, id, path, rest @ ..] = args else {
            return Err(
                "usage: runner create|exec ID PATH --result FILE [--console-socket SOCK]".into(),
            );
        };
        let job = match verb.as_str() {
            "create" => Job::Create {
                id: id.clone(),
                bundle: path.into(),
            },
            "exec" => Job::Exec {
                id: id.clone(),
                process: path.into(),
            },
            other => return Err(format!("unknown runner verb `{other}`")),
        };
        let (mut result, mut console_socket) = (None, None);
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--result" => result = Some(PathBuf::from(val)),
                "--console-socket" => console_socket = Some(PathBuf::from(val)),
                other => return Err(format!("unknown runner flag `{other}`")),
            }
        }
        let result = result.ok_or("--result is required")?;
        Ok(Invocation {
            job,
            result,
            console_socket,
        })
    }
}

/// The helper's entry point; never returns.
pub fn main(args: &[String]) -> ! {
    let inv = match Invocation::parse(args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("cocoon-agent runner: {e}");
            std::process::exit(2);
        }
    };
    let t = std::time::Instant::now();
    let outcome = match run(&inv) {
        // The time inside libcontainer, against the agent's spawn-to-exit time, shows what the
        // re-exec itself costs (logged by the agent at debug level).
        Ok(pid) => {
            serde_json::json!({ "pid": pid, "libcontainer_ms": t.elapsed().as_millis() as u64 })
        }
        Err(e) => serde_json::json!({ "error": e }),
    };
    let ok = outcome.get("pid").is_some();
    if let Err(e) = std::fs::write(&inv.result, outcome.to_string()) {
        eprintln!("cocoon-agent runner: write {}: {e}", inv.result.display());
        std::process::exit(3);
    }
    std::process::exit(if ok { 0 } else { 1 });
}

fn run(inv: &Invocation) -> Result<i32, String> {
    let id = match &inv.job {
        Job::Create { id, .. } | Job::Exec { id, .. } => id.clone(),
    };
    let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(STATE_ROOT)
        .map_err(|e| e.to_string())?
        .with_console_socket(inv.console_socket.as_deref());
    match &inv.job {
        Job::Create { bundle, .. } => {
            let spec = bundle_spec(bundle)?;
            let mut container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| describe(&e))?;
            let pid = container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "the container has no init pid".to_owned())?;
            // The mounts' own propagation, which libcontainer does not apply; a container that
            // can't have it is not left half made.
            if let Err(e) = propagation::apply(pid, &propagation::requested(&spec)) {
                let _ = container.delete(true);
                return Err(e);
            }
            Ok(pid)
        }
        Job::Exec { process, .. } => with_seccomp(builder, &id)?
            .as_tenant()
            .with_process(Some(process))
            .with_detach(true)
            .build()
            .map(|p| p.as_raw())
            .map_err(|e| describe(&e)),
    }
}

/// The builder of an exec into container `id`, with the container's seccomp filter applied to
/// the process ([`crate::exec_seccomp`]: libcontainer drops it for execs).
fn with_seccomp(builder: ContainerBuilder, id: &str) -> Result<ContainerBuilder, String> {
    let container = Container::load(Path::new(STATE_ROOT).join(id)).map_err(|e| describe(&e))?;
    let spec = bundle_spec(container.bundle())?;
    Ok(match SeccompExecutor::for_container(&spec)? {
        Some(ex) => builder.with_executor(ex),
        None => builder,
    })
}

/// The (guest) spec in `bundle`, as the agent wrote it there.
fn bundle_spec(bundle: &Path) -> Result<Spec, String> {
    let config = bundle.join("config.json");
    Spec::load(&config).map_err(|e| format!("read {}: {e}", config.display()))
}

/// libcontainer's error with its causes, which is where "executable not found" lives.
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads the helper's result file.
pub fn read_result(path: &Path) -> Result<i32, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("the runner left no result ({e})"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("bad runner result {text:?}: {e}"))?;
    if let Some(pid) = v["pid"].as_i64() {
        return i32::try_from(pid).map_err(|_| format!("bad pid {pid}"));
    }
    Err(v["error"]
        .as_str()
        .unwrap_or("the runner failed without a message")
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocations_round_trip() {
        for inv in [
            Invocation {
                job: Job::Create {
                    id: "c1".into(),
                    bundle: "/b".into(),
                },
                result: "/r".into(),
                console_socket: None,
            },
            Invocation {
                job: Job::Exec {
                    id: "c1".into(),
                    process: "/p.json".into(),
                },
                result: "/r".into(),
                console_socket: Some("/t.sock".into()),
            },
        ] {
            let args = inv.to_args();
            assert_eq!(args[0], "runner");
            assert_eq!(Invocation::parse(&args[1..]).unwrap(), inv);
        }
        assert!(Invocation::parse(&["create".into(), "c".into()]).is_err());
        assert!(Invocation::parse(&[
            "kill".into(),
            "c".into(),
            "/b".into(),
            "--result".into(),
            "/r".into()
        ])
        .is_err());
    }

    #[test]
    fn results_are_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        std::fs::write(&p, r#"{"pid": 42}"#).unwrap();
        assert_eq!(read_result(&p), Ok(42));
        std::fs::write(&p, r#"{"error": "executable 'nope' not found in $PATH"}"#).unwrap();
        assert!(read_result(&p).unwrap_err().contains("nope"));
        assert!(read_result(&d.path().join("missing"))
            .unwrap_err()
            .contains("no result"));
    }
}
