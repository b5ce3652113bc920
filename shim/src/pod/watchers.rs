//! The pod's watchers on the guest: one per process for its exit, one per VM for OOM events.
//! Both wait on the guest without a bound, by design, and end with the agent connection.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cocoon_protocol::agent as ag;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::ProcessRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Inner, Pod};
use crate::events::Event;
use crate::phase::{Phase, PhaseLine};
use crate::process::Exit;

/// For calls that wait on the guest (a process's exit, the next OOM event).
fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

/// The shortest time between two OOM events published for one container.
const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// After a process exited, how long its output may stay silent but open before the exit is
/// published anyway (a child it left behind holds the stream).
const OUTPUT_IDLE: Duration = Duration::from_secs(2);

impl Pod {
    /// Relays the guest's OOM events for this pod's containers, at most one per container per
    /// [`OOM_EVENT_INTERVAL`]: the guest decides how many it sends, and containerd needs to hear
    /// of a container's OOM kill, not of each one. A weak reference: the watcher must not keep
    /// a pod alive, and it ends with the agent connection.
    pub(super) fn watch_oom(&self, agent: AgentServiceClient) -> JoinHandle<()> {
        let pod: Weak<Inner> = Arc::downgrade(&self.inner);
        let mut last: HashMap<String, tokio::time::Instant> = HashMap::new();
        tokio::spawn(async move {
            while let Ok(e) = agent
                .get_oom_event(no_timeout(), &ag::GetOOMEventRequest::new())
                .await
            {
                let Some(inner) = pod.upgrade() else {
                    return;
                };
                let pod = Pod { inner };
                let ours = pod
                    .with_state(|s| {
                        let ours = s.containers.contains_key(&e.container_id);
                        s.oom_events += u64::from(ours);
                        ours
                    })
                    .await;
                if ours {
                    let now = tokio::time::Instant::now();
                    let recent = last
                        .get(&e.container_id)
                        .is_some_and(|t| now.duration_since(*t) < OOM_EVENT_INTERVAL);
                    if recent {
                        log::debug!(
                            "OOM event for {} within the interval; dropped",
                            e.container_id
                        );
                        continue;
                    }
                    last.insert(e.container_id.clone(), now);
                    pod.publish(Event::Oom(e.container_id)).await;
                } else {
                    log::warn!(
                        "the guest reported an OOM kill for {:?}, which is not a container of pod {}; ignored",
                        e.container_id,
                        pod.id()
                    );
                }
            }
        })
    }

    /// Waits for a process's exit in the guest and for its output to drain, then records and
    /// publishes it. A broken agent connection ends the process with 255 and says why.
    pub(super) fn watch_exit(
        &self,
        agent: AgentServiceClient,
        process: ProcessRef,
        pid: u32,
        outputs: crate::io::Outputs,
        tx: watch::Sender<Option<Exit>>,
    ) {
        let pod = self.clone();
        tokio::spawn(async move {
            let req = ag::WaitProcessRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_wire().to_owned(),
                ..Default::default()
            };
            let exit = match agent.wait_process(no_timeout(), &req).await {
                Ok(r) => Exit {
                    status: u32::try_from(r.status).unwrap_or(255),
                    at_unix_nanos: r.exited_at_unix_nanos,
                },
                Err(e) => {
                    match pod.vm_gone_after_a_broken_call().await {
                        Some(why) => {
                            log::error!("pod VM {} died; {process} is lost: {why}", pod.id())
                        }
                        None => {
                            log::error!("lost the guest agent while waiting for {process}: {e}")
                        }
                    }
                    Exit::now(255)
                }
            };
            if !outputs.drain(OUTPUT_IDLE).await {
                log::warn!(
                    "{process} exited, but something in the guest still holds its output open \
                     and writes nothing; its exit is published now, the relay stays"
                );
            }
            if process.exec_id.is_none() {
                pod.copy_back(&process.container_id).await;
            }
            pod.with_state(|s| {
                if let Ok(p) = s.process_mut(&process) {
                    p.status = crate::process::Status::Stopped;
                }
            })
            .await;
            PhaseLine::new(Phase::Exited, process.clone()).emit();
            let _ = tx.send(Some(exit));
            pod.publish(Event::Exit { process, pid, exit }).await;
        });
    }
}
