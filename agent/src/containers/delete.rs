//! RemoveContainer: ends what is left of a container and forgets it.

use std::path::Path;

use cocoon_protocol::ProcessRef;

use super::{blocking, load, Failure, Manager, Res};
use crate::runner::STATE_ROOT;

impl Manager {
    pub async fn remove(&self, id: &str) -> Res<()> {
        let c = self.get(id)?;
        c.oom_watch.abort();
        let cid = id.to_owned();
        blocking(move || delete_state(&cid)).await?;
        let _ = std::fs::remove_dir_all(&c.bundle);
        self.layers.disassemble(id);
        self.table().remove(id);
        self.hub.discard(&ProcessRef::init(id));
        log::info!("container {id} removed");
        Ok(())
    }
}

/// Kills what is left and removes the cgroup and libcontainer state; fine if there is none.
pub(super) fn delete_state(id: &str) -> Res<()> {
    if !Path::new(STATE_ROOT).join(id).exists() {
        return Ok(());
    }
    load(id)?
        .delete(true)
        .map_err(|e| Failure::Failed(format!("delete {id}: {e}")))
}
