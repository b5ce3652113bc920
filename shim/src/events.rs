//! The events a pod publishes to containerd, as one typed enum: the topic and the protobuf
//! message both come from the variant, so an event can't go out under the wrong topic.
//!
//! The pod publishes through the [`EventSink`] seam: containerd's publisher in the shim
//! ([`RemoteSink`]), a recording sink in the unit tests.

use async_trait::async_trait;
use cocoon_protocol::ProcessRef;
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::topics;

use crate::forwarder::Forwarder;
use crate::process::{Exit, StdioPaths};

/// containerd's time type for a Unix time in nanoseconds.
pub fn timestamp(unix_nanos: u64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(unix_nanos / 1_000_000_000).unwrap_or(0);
    t.nanos = i32::try_from(unix_nanos % 1_000_000_000).unwrap_or(0);
    t
}

/// When a process exited, as containerd's events and responses carry it.
pub fn exited_at(exit: Exit) -> MessageField<Timestamp> {
    MessageField::some(timestamp(exit.at_unix_nanos))
}

/// One event of the Task API.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create {
        container_id: String,
        bundle: String,
        rootfs: Vec<api::Mount>,
        stdio: StdioPaths,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    ExecAdded(ProcessRef),
    ExecStarted {
        process: ProcessRef,
        pid: u32,
    },
    /// A process ended and its output reached containerd.
    Exit {
        process: ProcessRef,
        pid: u32,
        exit: Exit,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit: Exit,
    },
    Paused(String),
    Resumed(String),
    Oom(String),
}

impl Event {
    /// The same event with its pid, unless 0, replaced by `reported` (the host pid the shim
    /// reports for every process of the pod, see `Pod::reported_pid`).
    pub fn with_pid(mut self, reported: u32) -> Event {
        match &mut self {
            Event::Create { pid, .. }
            | Event::Start { pid, .. }
            | Event::ExecStarted { pid, .. }
            | Event::Exit { pid, .. }
            | Event::Delete { pid, .. } => {
                if *pid != 0 {
                    *pid = reported;
                }
            }
            Event::ExecAdded(_) | Event::Paused(_) | Event::Resumed(_) | Event::Oom(_) => {}
        }
        self
    }

    pub fn topic(&self) -> &'static str {
        match self {
            Event::Create { .. } => topics::TASK_CREATE_EVENT_TOPIC,
            Event::Start { .. } => topics::TASK_START_EVENT_TOPIC,
            Event::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Event::ExecStarted { .. } => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Event::Exit { .. } => topics::TASK_EXIT_EVENT_TOPIC,
            Event::Delete { .. } => topics::TASK_DELETE_EVENT_TOPIC,
            Event::Paused(_) => topics::TASK_PAUSED_EVENT_TOPIC,
            Event::Resumed(_) => topics::TASK_RESUMED_EVENT_TOPIC,
            Event::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
        }
    }

    /// containerd's message for this event.
    pub fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            Event::Create {
                container_id,
                bundle,
                rootfs,
                stdio,
                pid,
            } => Box::new(ev::TaskCreate {
                container_id,
                bundle,
                rootfs,
                io: MessageField::some(ev::TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
            Event::Start { container_id, pid } => Box::new(ev::TaskStart {
                container_id,
                pid,
                ..Default::default()
            }),
            Event::ExecAdded(p) => Box::new(ev::TaskExecAdded {
                exec_id: p.exec_wire().to_owned(),
                container_id: p.container_id,
                ..Default::default()
            }),
            Event::ExecStarted { process, pid } => Box::new(ev::TaskExecStarted {
                exec_id: process.exec_wire().to_owned(),
                container_id: process.container_id,
                pid,
                ..Default::default()
            }),
            Event::Exit { process, pid, exit } => Box::new(ev::TaskExit {
                // containerd names the init process by its container id here.
                id: process
                    .exec_id
                    .clone()
                    .unwrap_or_else(|| process.container_id.clone()),
                container_id: process.container_id,
                pid,
                exit_status: exit.status,
                exited_at: exited_at(exit),
                ..Default::default()
            }),
            Event::Delete {
                container_id,
                pid,
                exit,
            } => Box::new(ev::TaskDelete {
                id: container_id.clone(),
                container_id,
                pid,
                exit_status: exit.status,
                exited_at: exited_at(exit),
                ..Default::default()
            }),
            Event::Paused(container_id) => Box::new(ev::TaskPaused {
                container_id,
                ..Default::default()
            }),
            Event::Resumed(container_id) => Box::new(ev::TaskResumed {
                container_id,
                ..Default::default()
            }),
            Event::Oom(container_id) => Box::new(ev::TaskOOM {
                container_id,
                ..Default::default()
            }),
        }
    }
}

/// Where a pod's events go.
#[async_trait]
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Publishes one event; a failure is logged, never returned: an event lost must not fail
    /// the call that caused it.
    async fn publish(&self, event: Event);
}

/// containerd's side: each event as an envelope, queued on the [`Forwarder`], which holds it
/// until containerd takes it (also across a containerd restart).
pub struct RemoteSink {
    forwarder: Forwarder,
    namespace: String,
}

impl RemoteSink {
    pub fn new(forwarder: Forwarder, namespace: String) -> RemoteSink {
        RemoteSink {
            forwarder,
            namespace,
        }
    }
}

impl std::fmt::Debug for RemoteSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSink")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventSink for RemoteSink {
    async fn publish(&self, event: Event) {
        let topic = event.topic();
        // The same Any the containerd-shim crate's publisher makes.
        let any = match convert_to_any(event.into_message()) {
            Ok(any) => any,
            Err(e) => {
                log::error!("encoding event {topic}: {e}");
                return;
            }
        };
        let envelope = Envelope {
            timestamp: MessageField::some(timestamp(crate::process::now_nanos())),
            namespace: self.namespace.clone(),
            topic: topic.to_owned(),
            event: MessageField::some(any),
            ..Default::default()
        };
        self.forwarder.send(envelope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_seconds_and_nanos() {
        let t = timestamp(3_000_000_007);
        assert_eq!((t.seconds, t.nanos), (3, 7));
    }

    #[test]
    fn exit_of_an_init_is_named_by_its_container() {
        let exit = Exit {
            status: 3,
            at_unix_nanos: 1_500_000_000,
        };
        let m = Event::Exit {
            process: ProcessRef::init("c1"),
            pid: 7,
            exit,
        }
        .into_message();
        let m = m.downcast_box::<ev::TaskExit>().ok().unwrap();
        assert_eq!((m.id.as_str(), m.container_id.as_str()), ("c1", "c1"));
        assert_eq!((m.exit_status, m.exited_at.seconds), (3, 1));
        let e = Event::Exit {
            process: ProcessRef::exec("c1", "e1"),
            pid: 8,
            exit,
        };
        assert_eq!(e.topic(), topics::TASK_EXIT_EVENT_TOPIC);
        let m = e
            .into_message()
            .downcast_box::<ev::TaskExit>()
            .ok()
            .unwrap();
        assert_eq!(m.id, "e1");
    }
}
