//! The "phase …" log lines: a contract between the shim, which writes them at the steps of a
//! container's life, and `make bench` (`cocoon-bench`), which reads them back from containerd's
//! log to split a cold start into its parts. [`PhaseLine::emit`] is the one writer and
//! [`PhaseLine::find`] the one reader, so the two can't drift apart.
//!
//! Format: `phase <name> <process>` and, for [`Phase::Booted`],
//! ` vmm_started_ms=<n> agent_ready_ms=<n>` (host time from the start of the boot).

use std::fmt;
use std::time::Duration;

use cocoon_protocol::ProcessRef;

/// A step in a container's life, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// containerd's Create arrived (before any VM exists).
    CreateBegin,
    /// The pod VM booted for this container and its agent answered.
    Booted {
        vmm_started: Duration,
        agent_ready: Duration,
    },
    /// The container exists in the guest; its init has not run yet.
    Created,
    /// Its init process runs.
    Started,
    /// The process exited and its output reached containerd.
    Exited,
    /// The container is gone from the guest and the host.
    Deleted,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::CreateBegin => "create-begin",
            Phase::Booted { .. } => "booted",
            Phase::Created => "created",
            Phase::Started => "started",
            Phase::Exited => "exited",
            Phase::Deleted => "deleted",
        }
    }
}

/// One phase of one process, as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseLine {
    pub phase: Phase,
    pub process: ProcessRef,
}

const PREFIX: &str = "phase ";

impl PhaseLine {
    pub fn new(phase: Phase, process: ProcessRef) -> PhaseLine {
        PhaseLine { phase, process }
    }

    /// Writes the line to the shim's log at info level (containerd keeps it with a timestamp).
    pub fn emit(&self) {
        log::info!("{self}");
    }

    /// Finds a phase line in one line of a log (containerd wraps it in its own fields, e.g.
    /// `time="…" level=info msg="phase created c1" runtime=…`).
    pub fn find(log_line: &str) -> Option<PhaseLine> {
        let at = log_line.find(PREFIX)?;
        let rest = log_line[at + PREFIX.len()..]
            .split(['"', '\n'])
            .next()
            .unwrap_or("");
        let mut words = rest.split(' ');
        let name = words.next()?;
        let process = words.next().filter(|p| !p.is_empty())?;
        let process = match process.split_once('/') {
            Some((c, e)) => ProcessRef::exec(c, e),
            None => ProcessRef::init(process),
        };
        let phase = match name {
            "create-begin" => Phase::CreateBegin,
            "booted" => {
                let mut field = |key: &str| -> Option<Duration> {
                    let v = words.next()?.strip_prefix(key)?.strip_prefix('=')?;
                    Some(Duration::from_micros(
                        (v.parse::<f64>().ok()? * 1000.0) as u64,
                    ))
                };
                Phase::Booted {
                    vmm_started: field("vmm_started_ms")?,
                    agent_ready: field("agent_ready_ms")?,
                }
            }
            "created" => Phase::Created,
            "started" => Phase::Started,
            "exited" => Phase::Exited,
            "deleted" => Phase::Deleted,
            _ => return None,
        };
        Some(PhaseLine { phase, process })
    }
}

impl fmt::Display for PhaseLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{} {}", self.phase.name(), self.process)?;
        if let Phase::Booted {
            vmm_started,
            agent_ready,
        } = self.phase
        {
            write!(
                f,
                " vmm_started_ms={:.3} agent_ready_ms={:.3}",
                vmm_started.as_secs_f64() * 1000.0,
                agent_ready.as_secs_f64() * 1000.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_round_trips_through_a_containerd_log_line() {
        let phases = [
            Phase::CreateBegin,
            Phase::Booted {
                vmm_started: Duration::from_micros(41_250),
                agent_ready: Duration::from_millis(1_902),
            },
            Phase::Created,
            Phase::Started,
            Phase::Exited,
            Phase::Deleted,
        ];
        for phase in phases {
            for process in [ProcessRef::init("c1"), ProcessRef::exec("c1", "e1")] {
                let line = PhaseLine::new(phase, process);
                let logged = format!(
                    "time=\"2026-11-28T04:00:00.1Z\" level=info msg=\"{line}\" runtime=io.containerd.cocoon.v2"
                );
                assert_eq!(PhaseLine::find(&logged), Some(line));
            }
        }
    }

    #[test]
    fn other_lines_are_not_phases() {
        assert_eq!(PhaseLine::find("sandbox c1: agent ready"), None);
        assert_eq!(PhaseLine::find("msg=\"phase warped c1\""), None);
        assert_eq!(PhaseLine::find("msg=\"phase created\""), None);
        assert_eq!(PhaseLine::find("msg=\"phase booted c1\""), None);
    }
}
