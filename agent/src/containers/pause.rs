//! PauseContainer and ResumeContainer: the cgroup freezer, through libcontainer.

use super::{blocking, load, Failure, Manager, Res};

impl Manager {
    /// Freezes (`pause`) or thaws (`!pause`) every process of the container.
    pub async fn pause(&self, id: &str, pause: bool) -> Res<()> {
        self.get(id)?;
        let cid = id.to_owned();
        blocking(move || {
            let mut c = load(&cid)?;
            let r = if pause { c.pause() } else { c.resume() };
            r.map_err(|e| {
                Failure::Failed(format!("{}: {e}", if pause { "pause" } else { "resume" }))
            })
        })
        .await
    }
}
