//! Which process a call or a stdio stream is about, and the stdio hello line that names one.
//!
//! Both ends use these types so the wire format lives in one place: the agent API carries the
//! exec id as a string that is empty for a container's init process, and the stdio hello line
//! writes that init process as `-` (a space-separated line can't carry an empty field).

use std::fmt;

/// A container's init process (`exec_id: None`) or one of its exec processes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessRef {
    pub container_id: String,
    pub exec_id: Option<String>,
}

impl ProcessRef {
    /// The init process of `container_id`.
    pub fn init(container_id: impl Into<String>) -> ProcessRef {
        ProcessRef {
            container_id: container_id.into(),
            exec_id: None,
        }
    }

    /// An exec process of `container_id`.
    pub fn exec(container_id: impl Into<String>, exec_id: impl Into<String>) -> ProcessRef {
        ProcessRef {
            container_id: container_id.into(),
            exec_id: Some(exec_id.into()),
        }
    }

    /// From the `(container_id, exec_id)` pair of an RPC, where an empty exec id is the init.
    pub fn from_wire(container_id: &str, exec_id: &str) -> ProcessRef {
        ProcessRef {
            container_id: container_id.to_owned(),
            exec_id: (!exec_id.is_empty()).then(|| exec_id.to_owned()),
        }
    }

    /// The exec id as RPCs carry it: empty for the init process.
    pub fn exec_wire(&self) -> &str {
        self.exec_id.as_deref().unwrap_or("")
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_none()
    }
}

/// `container` for an init process, `container/exec` for an exec: for logs and errors.
impl fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.exec_id {
            None => f.write_str(&self.container_id),
            Some(e) => write!(f, "{}/{e}", self.container_id),
        }
    }
}

/// One of a process's stdio streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioKind {
    Stdin,
    Stdout,
    /// Unused for terminal processes: the pty merges it into stdout.
    Stderr,
}

impl StdioKind {
    pub fn name(self) -> &'static str {
        match self {
            StdioKind::Stdin => "stdin",
            StdioKind::Stdout => "stdout",
            StdioKind::Stderr => "stderr",
        }
    }

    fn parse(s: &str) -> Option<StdioKind> {
        match s {
            "stdin" => Some(StdioKind::Stdin),
            "stdout" => Some(StdioKind::Stdout),
            "stderr" => Some(StdioKind::Stderr),
            _ => None,
        }
    }
}

/// The first line the host sends on a stdio connection to `STDIO_PORT`:
/// `<container> <exec or -> <stdin|stdout|stderr>\n`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StdioHello {
    pub process: ProcessRef,
    pub stream: StdioKind,
}

/// What the init process is called in a hello line.
const INIT_IN_HELLO: &str = "-";

/// The longest hello line a reader needs to accept, newline included.
pub const MAX_HELLO_LEN: usize = 512;

impl StdioHello {
    /// The line to send, newline included.
    pub fn to_line(&self) -> String {
        let eid = self.process.exec_id.as_deref().unwrap_or(INIT_IN_HELLO);
        format!(
            "{} {eid} {}\n",
            self.process.container_id,
            self.stream.name()
        )
    }

    /// Parses a hello line without its newline.
    pub fn parse(line: &str) -> Result<StdioHello, String> {
        let parts: Vec<&str> = line.split(' ').collect();
        let [cid, eid, kind] = parts[..] else {
            return Err(format!(
                "bad stdio hello {line:?}: want `<container> <exec|{INIT_IN_HELLO}> <stream>`"
            ));
        };
        let stream = StdioKind::parse(kind)
            .ok_or_else(|| format!("bad stdio hello {line:?}: unknown stream {kind:?}"))?;
        if cid.is_empty() || eid.is_empty() {
            return Err(format!("bad stdio hello {line:?}: empty id"));
        }
        let process = if eid == INIT_IN_HELLO {
            ProcessRef::init(cid)
        } else {
            ProcessRef::exec(cid, eid)
        };
        Ok(StdioHello { process, stream })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_lines_round_trip() {
        for h in [
            StdioHello {
                process: ProcessRef::init("c1"),
                stream: StdioKind::Stdout,
            },
            StdioHello {
                process: ProcessRef::exec("c1", "e2"),
                stream: StdioKind::Stdin,
            },
        ] {
            let line = h.to_line();
            assert!(line.ends_with('\n') && line.len() <= MAX_HELLO_LEN);
            assert_eq!(StdioHello::parse(line.trim_end_matches('\n')), Ok(h));
        }
        assert_eq!(
            StdioHello::parse("c1 - stdout").map(|h| h.process),
            Ok(ProcessRef::init("c1"))
        );
        assert!(StdioHello::parse("c1 - tty").is_err());
        assert!(StdioHello::parse("c1 stdout").is_err());
        assert!(StdioHello::parse("c1  stdout").is_err());
    }

    #[test]
    fn wire_exec_ids() {
        assert_eq!(ProcessRef::from_wire("c", ""), ProcessRef::init("c"));
        assert_eq!(ProcessRef::from_wire("c", "e").exec_wire(), "e");
        assert_eq!(ProcessRef::init("c").exec_wire(), "");
        assert_eq!(ProcessRef::exec("c", "e").to_string(), "c/e");
    }
}
