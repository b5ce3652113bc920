//! containerd's Task API (v2) as a thin adapter over [`Pod`]: each RPC converts its request
//! (`convert`), makes one call on the pod and converts the answer. Nothing here holds state or
//! takes a lock; the pod model does both.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::ProcessRef;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::TtrpcResult;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::Code;

use crate::convert::{self, to_status};
use crate::events::exited_at;
use crate::pod::Pod;

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    pod: Pod,
    /// Signalled once Shutdown finds the pod empty; the shim process then exits.
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

impl TaskService {
    pub fn new(pod: Pod, exit: Arc<ExitSignal>) -> Self {
        TaskService { pod, exit }
    }
}

fn empty<T>(r: crate::Result<T>) -> TtrpcResult<api::Empty> {
    r.map(|_| api::Empty::new()).map_err(to_status)
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let create = convert::create_request(&req).map_err(to_status)?;
        let pid = self.pod.create(create).await.map_err(to_status)?;
        Ok(api::CreateTaskResponse {
            pid: self.pod.reported_pid(pid),
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        let pid = self.pod.start(&p).await.map_err(to_status)?;
        Ok(api::StartResponse {
            pid: self.pod.reported_pid(pid),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        let stdio = convert::stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        empty(self.pod.add_exec(&p, stdio, spec).await)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        let mut st = self.pod.state(&p).await.map_err(to_status)?;
        st.pid = self.pod.reported_pid(st.pid);
        let id = p.exec_id.unwrap_or(p.container_id);
        Ok(convert::state_response(id, req.exec_id, st))
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        let exit = self.pod.wait(&p).await.map_err(to_status)?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: exited_at(exit),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        empty(self.pod.signal(&p, req.signal, req.all).await)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        let (pid, exit) = self.pod.delete(&p).await.map_err(to_status)?;
        Ok(api::DeleteResponse {
            pid: self.pod.reported_pid(pid),
            exit_status: exit.status,
            exited_at: exited_at(exit),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self.pod.pids(&req.id).await.map_err(to_status)?;
        let processes = pids
            .into_iter()
            .map(|pid| api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        empty(self.pod.set_paused(&req.id, true).await)
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        empty(self.pod.set_paused(&req.id, false).await)
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        empty(self.pod.resize_tty(&p, req.height, req.width).await)
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let p = ProcessRef::from_wire(&req.id, &req.exec_id);
        empty(self.pod.close_stdin(&p).await)
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let json = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        empty(self.pod.update(&req.id, json).await)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = self.pod.stats(&req.id).await.map_err(to_status)?;
        let any = convert::metrics(&s).map_err(to_status)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.reported_pid(self.pod.init_pid(&req.id).await),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.pod.shutdown().await {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(containerd_shim_protos::ttrpc::Error::RpcStatus(
            containerd_shim_protos::ttrpc::get_status(
                Code::UNIMPLEMENTED,
                "checkpoint is not supported by the cocoon runtime (VM-isolated pods cannot be checkpointed with CRIU)",
            ),
        ))
    }
}
