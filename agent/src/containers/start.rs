//! StartContainer: lets the created init process run its program.

use super::{blocking, load, Failure, Manager, Res};

impl Manager {
    /// Starts the init process; answers its pid.
    pub async fn start(&self, id: &str) -> Res<i32> {
        let c = self.get(id)?;
        let cid = id.to_owned();
        blocking(move || {
            load(&cid)?
                .start()
                .map_err(|e| Failure::Failed(format!("start: {e}")))
        })
        .await?;
        log::info!("container {id} started");
        Ok(c.init.pid)
    }
}
