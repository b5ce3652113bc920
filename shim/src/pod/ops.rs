//! The pod's calls on existing containers and processes: start, exec, state, wait, signals,
//! pause, stdio and resource calls. Create, delete and shutdown, which may boot or stop the
//! VM, are in `mod.rs` with the lifecycle lock.

use cocoon_protocol::agent as ag;
use cocoon_protocol::protobuf::MessageField;
use cocoon_protocol::ProcessRef;

use super::{Pod, ProcessState};
use crate::events::Event;
use crate::phase::{Phase, PhaseLine};
use crate::process::{wire_stdio, Exit, Process, Status, StdioPaths};
use crate::{Error, Result};

/// The one signal a Kill must deliver even when the guest does not answer.
const SIGKILL: u32 = 9;

impl Pod {
    /// Starts a container's init process or an exec added before; returns its guest pid.
    pub async fn start(&self, p: &ProcessRef) -> Result<u32> {
        match &p.exec_id {
            None => self.start_init(&p.container_id).await,
            Some(_) => self.start_exec(p).await,
        }
    }

    async fn start_init(&self, cid: &str) -> Result<u32> {
        let (guest, hooks, bundle) = self
            .with_state(|s| {
                let c = s.container(cid)?;
                Ok::<_, Error>((s.guest()?, c.hooks.clone(), c.bundle.clone()))
            })
            .await?;
        if let Some(network) = &guest.network {
            network.attach().await?;
        }
        let req = ag::StartContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        let pid = guest
            .call("start", guest.agent.start_container(guest.ctx(), &req))
            .await?
            .pid;
        self.with_state(|s| {
            if let Ok(c) = s.container_mut(cid) {
                c.init.status = Status::Running;
            }
        })
        .await;
        PhaseLine::new(Phase::Started, ProcessRef::init(cid)).emit();
        self.later_hooks(&hooks, crate::hooks::Stage::Started, cid, &bundle, pid)
            .await;
        self.publish(Event::Start {
            container_id: cid.to_owned(),
            pid,
        })
        .await;
        Ok(pid)
    }

    async fn start_exec(&self, p: &ProcessRef) -> Result<u32> {
        let started = self.run_exec(p).await;
        if started.is_err() {
            // As runc's shim does for an exec it could not start: the process is over before it
            // began, so a Wait on it (containerd's clean-up of a failed exec) returns at once.
            self.with_state(|s| {
                if let Ok(proc) = s.process_mut(p) {
                    proc.fail_to_start();
                }
            })
            .await;
        }
        started
    }

    async fn run_exec(&self, p: &ProcessRef) -> Result<u32> {
        let (guest, stdio, spec_json) = self
            .with_state(|s| {
                let proc = s.process(p)?;
                Ok::<_, Error>((s.guest()?, proc.stdio.clone(), proc.spec_json.clone()))
            })
            .await?;
        let relays = wire_stdio(&guest, p, &stdio).await?;
        let req = ag::ExecProcessRequest {
            container_id: p.container_id.clone(),
            exec_id: p.exec_wire().to_owned(),
            process_json: spec_json,
            stdio: MessageField::some(stdio.streams()),
            ..Default::default()
        };
        let started = guest
            .call("exec", guest.agent.exec_process(guest.ctx(), &req))
            .await
            .map(|r| r.pid);
        let (pid, relays) = relays.kept_if(started)?;
        let stdin = relays.stdin;
        let tx = self
            .with_state(|s| {
                let proc = s.process_mut(p).ok()?;
                proc.status = Status::Running;
                proc.attach(pid, stdin)
            })
            .await;
        if let Some(tx) = tx {
            self.watch_exit(guest.agent, p.clone(), pid, relays.outputs, tx);
        }
        self.publish(Event::ExecStarted {
            process: p.clone(),
            pid,
        })
        .await;
        Ok(pid)
    }

    /// Adds an exec process (OCI process JSON) to a container; Start runs it.
    pub async fn add_exec(
        &self,
        p: &ProcessRef,
        stdio: StdioPaths,
        spec_json: Vec<u8>,
    ) -> Result<()> {
        let Some(eid) = &p.exec_id else {
            return Err(Error::InvalidArgument("an exec needs an exec id".into()));
        };
        self.with_state(|s| {
            let c = s.container_mut(&p.container_id)?;
            if c.execs.contains_key(eid) {
                return Err(Error::AlreadyExists(format!("exec {eid}")));
            }
            c.execs.insert(eid.clone(), Process::new(stdio, spec_json));
            Ok(())
        })
        .await?;
        self.publish(Event::ExecAdded(p.clone())).await;
        Ok(())
    }

    pub async fn state(&self, p: &ProcessRef) -> Result<ProcessState> {
        self.with_state(|s| {
            let bundle = s.container(&p.container_id)?.bundle.clone();
            let proc = s.process(p)?;
            Ok(ProcessState {
                bundle,
                pid: proc.pid,
                status: proc.current_status(),
                stdio: proc.stdio.clone(),
                exit: proc.exit(),
            })
        })
        .await
    }

    /// Waits for a process's exit (after its output reached containerd).
    pub async fn wait(&self, p: &ProcessRef) -> Result<Exit> {
        let mut rx = self
            .with_state(|s| s.process(p).map(Process::exit_watch))
            .await?;
        let exit = *rx.wait_for(Option::is_some).await.map_err(|_| {
            Error::io(
                format!("waiting for {p}"),
                std::io::Error::other("exit watcher gone"),
            )
        })?;
        Ok(exit.unwrap_or(Exit::now(255)))
    }

    /// The init pid of a container, 0 if there is none.
    pub async fn init_pid(&self, cid: &str) -> u32 {
        self.with_state(|s| s.containers.get(cid).map_or(0, |c| c.init.pid))
            .await
    }

    pub async fn signal(&self, p: &ProcessRef, signal: u32, all: bool) -> Result<()> {
        let req = ag::SignalProcessRequest {
            container_id: p.container_id.clone(),
            exec_id: p.exec_wire().to_owned(),
            signal,
            all,
            ..Default::default()
        };
        let (guest, finished) = self
            .with_state(|s| {
                let finished = s.process(p)?.status == Status::Stopped;
                Ok::<_, Error>((s.guest(), finished))
            })
            .await?;
        // Like a process of a dead VM, a finished one has nothing left to signal: Kill
        // succeeds, so that a pod's stop never fails on what is already gone.
        if finished {
            return Ok(());
        }
        let guest = guest?;
        let sent = guest
            .call("kill", guest.agent.signal_process(guest.ctx(), &req))
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) => {
                // A broken connection may be a VMM that is still exiting. Anything else (the
                // agent's own answer, a frozen guest's timeout) comes from a live VM, and must
                // not wait: containerd may be deleting the task meanwhile.
                let gone = if connection_broke(&e) {
                    self.vm_gone_after_a_broken_call().await
                } else {
                    self.vm_gone().await
                };
                match gone {
                    Some(why) => {
                        log::info!("kill {p}: the pod VM is gone ({why}); nothing to signal");
                        Ok(())
                    }
                    // SIGKILL must not fail: when the guest can't be asked, the VM it runs in
                    // is stopped, which ends the process as surely (and every other one of the
                    // pod, which a guest that does not answer could not serve anyway).
                    None if signal == SIGKILL && matches!(e, Error::Timeout { .. }) => {
                        log::error!("kill {p}: {e}; stopping the pod VM so that the process ends");
                        self.kill_vm().await;
                        Ok(())
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// Freezes (`pause`) or thaws a container, then tells containerd.
    pub async fn set_paused(&self, cid: &str, pause: bool) -> Result<()> {
        let guest = self.guest().await?;
        if pause {
            let r = ag::PauseContainerRequest {
                container_id: cid.to_owned(),
                ..Default::default()
            };
            guest
                .call("pause", guest.agent.pause_container(guest.ctx(), &r))
                .await?;
        } else {
            let r = ag::ResumeContainerRequest {
                container_id: cid.to_owned(),
                ..Default::default()
            };
            guest
                .call("resume", guest.agent.resume_container(guest.ctx(), &r))
                .await?;
        }
        self.with_state(|s| {
            if let Ok(c) = s.container_mut(cid) {
                c.init.status = if pause {
                    Status::Paused
                } else {
                    Status::Running
                };
            }
        })
        .await;
        let event = if pause {
            Event::Paused(cid.to_owned())
        } else {
            Event::Resumed(cid.to_owned())
        };
        self.publish(event).await;
        Ok(())
    }

    /// Ends a process's stdin once what containerd wrote has been forwarded: our relay
    /// half-closes the stream, so the process reads all of it and then EOF. Closing in the
    /// guest first could drop buffered input.
    pub async fn close_stdin(&self, p: &ProcessRef) -> Result<()> {
        let relay = self
            .with_state(|s| {
                s.container_mut(&p.container_id).map(|c| {
                    c.process_mut(p.exec_id.as_deref())
                        .ok()
                        .and_then(|proc| proc.stdin_close.take())
                })
            })
            .await?;
        if let Some((close, done)) = relay {
            let _ = close.send(());
            let _ = done.await;
        }
        Ok(())
    }

    pub async fn resize_tty(&self, p: &ProcessRef, rows: u32, cols: u32) -> Result<()> {
        let req = ag::TtyWinResizeRequest {
            container_id: p.container_id.clone(),
            exec_id: p.exec_wire().to_owned(),
            rows,
            cols,
            ..Default::default()
        };
        let guest = self.guest().await?;
        guest
            .call("resize", guest.agent.tty_win_resize(guest.ctx(), &req))
            .await?;
        Ok(())
    }

    /// Applies new resources (OCI `LinuxResources` JSON) to a container's cgroup.
    pub async fn update(&self, cid: &str, resources_json: Vec<u8>) -> Result<()> {
        let req = ag::UpdateContainerRequest {
            container_id: cid.to_owned(),
            resources_json,
            ..Default::default()
        };
        let guest = self.guest().await?;
        guest
            .call("update", guest.agent.update_container(guest.ctx(), &req))
            .await?;
        Ok(())
    }

    pub async fn stats(&self, cid: &str) -> Result<ag::StatsContainerResponse> {
        let req = ag::StatsContainerRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        let guest = self.guest().await?;
        guest
            .call("stats", guest.agent.stats_container(guest.ctx(), &req))
            .await
    }

    pub async fn pids(&self, cid: &str) -> Result<Vec<u32>> {
        let req = ag::ListProcessesRequest {
            container_id: cid.to_owned(),
            ..Default::default()
        };
        let guest = self.guest().await?;
        Ok(guest
            .call("pids", guest.agent.list_processes(guest.ctx(), &req))
            .await?
            .pids)
    }
}

impl Pod {
    /// The shim was told to go (SIGTERM): every container is torn down whatever its state and
    /// the VM stopped; nothing of the pod is left on the host afterwards. Processes still
    /// running are reported exited (255) by their exit watchers as the agent connection drops.
    pub async fn terminate(&self) {
        let _lifecycle = self.inner.lifecycle.lock().await;
        let (containers, volumes, taken) = self
            .with_state(|s| {
                let containers: Vec<(String, crate::process::Container)> =
                    s.containers.drain().collect();
                let volumes = s.volumes.drain();
                s.footprint.mounts.clear();
                (containers, volumes, s.take_vm_if_empty())
            })
            .await;
        super::mounts::unmount_volumes(self.inner.mounter.as_ref(), &volumes);
        for (id, c) in containers {
            if let Some(rootfs) = &c.rootfs {
                super::mounts::unmount_rootfs(self.inner.mounter.as_ref(), rootfs);
            }
            log::info!("pod {}: container {id} torn down", self.id());
        }
        self.stop_vm(taken).await;
    }
}

/// Whether a call failed because the agent's connection broke (not with the agent's own
/// answer, nor a timeout).
fn connection_broke(e: &Error) -> bool {
    matches!(e, Error::Agent { source, .. } if !matches!(source, ttrpc::Error::RpcStatus(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_error(source: ttrpc::Error) -> Error {
        Error::Agent {
            call: "kill",
            source,
            console_tail: String::new(),
        }
    }

    #[test]
    fn only_a_broken_connection_waits_for_the_vm_to_die() {
        assert!(connection_broke(&agent_error(ttrpc::Error::Socket(
            "early eof".into()
        ))));
        let answer = ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no such process");
        assert!(!connection_broke(&agent_error(ttrpc::Error::RpcStatus(
            answer
        ))));
        assert!(!connection_broke(&Error::NotRunning));
    }
}
