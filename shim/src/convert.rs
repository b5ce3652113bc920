//! Conversions between containerd's Task API types and the pod model: requests into model
//! inputs, model answers into responses, and this crate's errors into ttrpc statuses.

use std::path::Path;

use cocoon_protocol::agent as ag;
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics as m;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::ttrpc::{self as sttrpc, Code};

use crate::events::exited_at;
use crate::pod::{CreateRequest, ProcessState};
use crate::process::{Status, StdioPaths};
use crate::rootfs::RootfsSource;
use crate::{annotations, host_ns, Error, Result};

pub fn status(s: Status) -> api::Status {
    match s {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Paused => api::Status::PAUSED,
        Status::Stopped => api::Status::STOPPED,
    }
}

fn ttrpc_status(code: Code, msg: impl ToString) -> sttrpc::Error {
    sttrpc::Error::RpcStatus(sttrpc::get_status(code, msg))
}

/// The ttrpc status containerd gets for an error. An agent's own status keeps its code and
/// message (prefixed with the call), so `ctr` shows what libcontainer said.
pub fn to_status(e: Error) -> sttrpc::Error {
    let code = match &e {
        Error::Agent {
            call,
            source: ttrpc::Error::RpcStatus(s),
            ..
        } => {
            let code = s.code.enum_value().unwrap_or(Code::UNKNOWN);
            return ttrpc_status(code, format!("{call}: {}", s.message));
        }
        Error::Agent { call, source, .. } => {
            return ttrpc_status(
                Code::UNAVAILABLE,
                format!("{call}: the guest agent did not answer: {source}"),
            );
        }
        Error::NotFound(_) => Code::NOT_FOUND,
        Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
        Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        Error::NotRunning | Error::Config(_) => Code::FAILED_PRECONDITION,
        Error::Boot(_) | Error::Vmm(_) | Error::ApiMismatch { .. } => Code::UNAVAILABLE,
        Error::Netns { .. } => Code::INVALID_ARGUMENT,
        Error::Timeout { .. } => Code::DEADLINE_EXCEEDED,
        Error::Io { .. } | Error::Network(_) => Code::INTERNAL,
    };
    ttrpc_status(code, e)
}

/// The stdio paths of a Create or Exec request.
pub fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

/// A Create request, with the bundle's `config.json` read and its annotations checked once.
pub fn create_request(req: &api::CreateTaskRequest) -> Result<CreateRequest> {
    let bundle = Path::new(&req.bundle);
    let spec_json = std::fs::read(bundle.join("config.json"))
        .map_err(|e| Error::InvalidArgument(format!("read {}/config.json: {e}", req.bundle)))?;
    let spec: serde_json::Value = serde_json::from_slice(&spec_json)
        .map_err(|e| Error::InvalidArgument(format!("config.json: {e}")))?;
    annotations::check(&spec).map_err(Error::InvalidArgument)?;
    host_ns::check(&spec).map_err(Error::InvalidArgument)?;
    let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
    Ok(CreateRequest {
        id: req.id.clone(),
        bundle: req.bundle.clone(),
        rootfs: RootfsSource {
            mounts: req.rootfs.clone(),
            bundle_rootfs: bundle.join(root),
        },
        stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        spec_json,
        spec,
    })
}

/// State's answer; `id` is the exec id for an exec and the container id for an init.
pub fn state_response(id: String, exec_id: String, st: ProcessState) -> api::StateResponse {
    api::StateResponse {
        id,
        bundle: st.bundle,
        pid: st.pid,
        status: status(st.status).into(),
        stdin: st.stdio.stdin,
        stdout: st.stdio.stdout,
        stderr: st.stdio.stderr,
        terminal: st.stdio.terminal,
        exit_status: st.exit.map_or(0, |e| e.status),
        exited_at: st.exit.map_or_else(MessageField::none, exited_at),
        exec_id,
        ..Default::default()
    }
}

/// The agent's cgroup v2 figures as containerd's `io.containerd.cgroups.v2.Metrics`.
pub fn metrics(s: &ag::StatsContainerResponse) -> Result<Any> {
    let metrics = m::Metrics {
        pids: MessageField::some(m::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(m::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            ..Default::default()
        }),
        memory: MessageField::some(m::MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            anon: s.memory_anon_bytes,
            file: s.memory_file_bytes,
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = metrics
        .write_to_bytes()
        .map_err(|e| Error::io("encode the metrics", std::io::Error::other(e)))?;
    Ok(Any {
        type_url: "io.containerd.cgroups.v2.Metrics".into(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_statuses_keep_their_code() {
        let agent_status = ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::NOT_FOUND,
            "executable file `nope` not found",
        ));
        let sttrpc::Error::RpcStatus(s) = to_status(Error::agent("create", agent_status)) else {
            panic!("not a status");
        };
        assert_eq!(s.code.enum_value(), Ok(Code::NOT_FOUND));
        assert_eq!(s.message, "create: executable file `nope` not found");
        let broken = Error::agent("kill", ttrpc::Error::LocalClosed);
        let sttrpc::Error::RpcStatus(s) = to_status(broken) else {
            panic!("not a status");
        };
        assert_eq!(s.code.enum_value(), Ok(Code::UNAVAILABLE));
        assert!(s
            .message
            .starts_with("kill: the guest agent did not answer"));
        for (e, code) in [
            (Error::NotFound("container x".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("exec e".into()), Code::ALREADY_EXISTS),
            (Error::NotRunning, Code::FAILED_PRECONDITION),
            (Error::InvalidArgument("bad".into()), Code::INVALID_ARGUMENT),
        ] {
            let sttrpc::Error::RpcStatus(s) = to_status(e) else {
                panic!("not a status");
            };
            assert_eq!(s.code.enum_value(), Ok(code));
        }
    }
}
