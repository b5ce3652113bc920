//! Starting a process, a container's init (create) or an exec, through the `runner` helper:
//! claim the host's stdio streams, wire them into the helper, run it, then attach what the
//! agent relays and track the exit. Shared by create and exec, which differ only in the
//! runner's [`Job`].

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host_stream::HostStream;
use cocoon_protocol::agent::StdioStreams;
use cocoon_protocol::{ProcessRef, StdioKind};

use super::tty::ConsoleSocket;
use super::wait::watch_exit;
use super::{failed, output, stdin, Failure, Manager, Process, Relays, Res};
use crate::runner::{self, Invocation, Job};

/// How long the host may take to connect a process's stdio streams.
const STREAM_WAIT: Duration = Duration::from_secs(10);

/// The host's streams for one process, those the call said it has.
#[derive(Debug)]
pub(super) struct HostStreams {
    pub(super) stdin: Option<HostStream>,
    pub(super) stdout: Option<HostStream>,
    pub(super) stderr: Option<HostStream>,
}

/// How a process's stdio is wired: set up before the runner runs, finished after it.
#[derive(Debug)]
pub(super) enum Wiring {
    /// The pty master comes back over the console socket; the agent relays both directions.
    Terminal {
        console: ConsoleSocket,
        stdin: Option<HostStream>,
        stdout: Option<HostStream>,
    },
    /// Each stream is a pipe on the process's side, relayed by the agent: stdin fed from the
    /// host's stream (kept here with its write end), stdout and stderr copied to theirs (kept
    /// with their read ends). Pipes, as under runc: a program may reopen `/dev/stdout`
    /// (nginx's logs, `tee /dev/stderr`), which a socket refuses with ENXIO.
    Plain {
        stdin: Option<(HostStream, OwnedFd)>,
        outputs: Vec<(OwnedFd, HostStream)>,
    },
}

impl Manager {
    /// Runs the helper for `job` with the process's stdio wired up, and tracks the process.
    /// `kill_rest`: a `cgroup.kill` to write once the process exits (a container init whose
    /// death does not end the rest of the container).
    pub(super) async fn launch(
        &self,
        p: &ProcessRef,
        bundle: &Path,
        job: Job,
        stdio: &StdioStreams,
        kill_rest: Option<PathBuf>,
    ) -> Res<Arc<Process>> {
        let tag = p.exec_id.as_deref().unwrap_or("init");
        let t0 = Instant::now();
        let result = bundle.join(format!("runner-{tag}.json"));
        let _ = std::fs::remove_file(&result);
        let streams = self.claim_streams(p, stdio).await?;

        let mut cmd = Command::new("/proc/self/exe");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let wiring = if stdio.terminal {
            Wiring::Terminal {
                console: ConsoleSocket::bind(&format!("{}/{tag}", p.container_id))?,
                stdin: streams.stdin,
                stdout: streams.stdout,
            }
        } else {
            Wiring::plain(&mut cmd, streams)?
        };
        let inv = Invocation {
            job,
            result: result.clone(),
            console_socket: wiring.console_path(),
        };
        cmd.args(inv.to_args());

        let t1 = Instant::now();
        let code = self.run_runner(cmd).await?;
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "{}/{tag}: stdio streams {} ms, runner {} ms: {}",
                p.container_id,
                (t1 - t0).as_millis(),
                t1.elapsed().as_millis(),
                std::fs::read_to_string(&result).unwrap_or_default()
            );
        }
        // A runner that exits non-zero reports libcontainer refusing the process (bad spec,
        // binary not found): the caller's mistake, not the agent's.
        let pid = runner::read_result(&result).map_err(|e| {
            if code == 0 {
                Failure::Failed(e)
            } else {
                Failure::Invalid(format!("cannot start the process: {e}"))
            }
        })?;

        let relays = wiring.attach()?;
        Ok(Arc::new(Process {
            pid,
            exit: watch_exit(self.reaper.clone(), pid, relays.output_done, kill_rest),
            stdin: Mutex::new(relays.stdin),
            tty: relays.tty,
        }))
    }

    /// Claims the streams `stdio` announces, one after the other.
    pub(super) async fn claim_streams(
        &self,
        p: &ProcessRef,
        stdio: &StdioStreams,
    ) -> Res<HostStreams> {
        Ok(HostStreams {
            stdin: self.claim(p, stdio.stdin, StdioKind::Stdin).await?,
            stdout: self.claim(p, stdio.stdout, StdioKind::Stdout).await?,
            // A pty merges stderr into stdout: a terminal process has no stderr stream.
            stderr: self
                .claim(p, stdio.stderr && !stdio.terminal, StdioKind::Stderr)
                .await?,
        })
    }

    async fn claim(
        &self,
        p: &ProcessRef,
        wanted: bool,
        kind: StdioKind,
    ) -> Res<Option<HostStream>> {
        if !wanted {
            return Ok(None);
        }
        self.hub
            .take(p, kind, STREAM_WAIT)
            .await
            .map(Some)
            .map_err(Failure::Failed)
    }

    /// Starts the helper and waits for it to exit; answers its exit code.
    async fn run_runner(&self, mut cmd: Command) -> Res<i32> {
        let child = cmd.spawn().map_err(failed("start the runner"))?;
        // Closes the agent's copies of the stdio fds handed to the helper, so that the process
        // ends up holding the only ones.
        drop(cmd);
        let helper_pid = i32::try_from(child.id()).unwrap_or(0);
        drop(child); // reaped by the Reaper, never waited on here
        Ok(self.reaper.wait(helper_pid).await)
    }
}

impl Wiring {
    /// Gives the helper a pipe end for each stream: the read end for stdin, the write ends for
    /// stdout and stderr.
    pub(super) fn plain(cmd: &mut Command, streams: HostStreams) -> Res<Wiring> {
        let mut stdin = None;
        if let Some(host) = streams.stdin {
            let (r, w) = stdin::pipe()?;
            cmd.stdin(Stdio::from(r));
            stdin = Some((host, w));
        }
        let mut outputs = Vec::new();
        if let Some(host) = streams.stdout {
            let (r, w) = output::pipe()?;
            cmd.stdout(Stdio::from(w));
            outputs.push((r, host));
        }
        if let Some(host) = streams.stderr {
            let (r, w) = output::pipe()?;
            cmd.stderr(Stdio::from(w));
            outputs.push((r, host));
        }
        Ok(Wiring::Plain { stdin, outputs })
    }

    fn console_path(&self) -> Option<PathBuf> {
        match self {
            Wiring::Terminal { console, .. } => Some(console.path().to_owned()),
            Wiring::Plain { .. } => None,
        }
    }

    /// Starts the relays once the process exists.
    pub(super) fn attach(self) -> Res<Relays> {
        match self {
            Wiring::Terminal {
                console,
                stdin,
                stdout,
            } => console.attach(stdin, stdout),
            Wiring::Plain { stdin, outputs } => {
                for (pipe, host) in outputs {
                    output::drain(pipe, host)?;
                }
                Ok(Relays {
                    stdin: stdin
                        .map(|(host, pipe)| stdin::feed(host, pipe))
                        .transpose()?,
                    ..Relays::default()
                })
            }
        }
    }
}
