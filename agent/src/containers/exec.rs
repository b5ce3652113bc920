//! ExecProcess: a new process in a running container, from an OCI process.json.

use cocoon_protocol::agent::StdioStreams;
use cocoon_protocol::ProcessRef;

use super::{check_id, failed, Failure, Manager, Res};
use crate::runner::Job;
use crate::spec;

impl Manager {
    /// Takes the ids as two strings, not a [`ProcessRef`]: an exec id is required here, and an
    /// empty one is refused like any other bad id.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &StdioStreams,
    ) -> Res<i32> {
        check_id("exec", exec_id)?;
        let c = self.get(id)?;
        if c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(exec_id)
        {
            return Err(Failure::Exists(format!(
                "exec {exec_id:?} already exists in container {id:?}"
            )));
        }
        let process = spec::check_process(process_json, &format!("{id}/{exec_id}"))
            .map_err(|e| Failure::Invalid(e.0))?;
        let path = c.bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&path, process.to_string()).map_err(failed("write the exec process"))?;
        let job = Job::Exec {
            id: id.to_owned(),
            process: path,
        };
        let p = ProcessRef::exec(id, exec_id);
        let proc = self
            .launch(&p, &c.bundle, job, stdio, None)
            .await
            .inspect_err(|_| self.hub.discard(&p))?;
        let pid = proc.pid;
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_owned(), proc);
        Ok(pid)
    }
}
