//! OOM kills: one watcher per container polls its cgroup's `memory.events`, and GetOOMEvent
//! long-polls for the next kill in any container.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Failure, Manager, Res};
use crate::spec;

/// How often memory.events is read for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(100);

impl Manager {
    /// Waits for the next OOM kill in any container.
    pub async fn next_oom(&self) -> Res<String> {
        self.oom_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| Failure::Failed("OOM watcher gone".into()))
    }
}

/// `oom_kill` from a cgroup v2 memory.events file.
fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Sends `id` on `tx` for each new OOM kill, until the receiver is gone or `remove` aborts the
/// task. An unreadable file is retried on the next tick rather than ending the watch.
pub(super) async fn watch_oom(id: String, tx: mpsc::UnboundedSender<String>) {
    let path = Path::new("/sys/fs/cgroup")
        .join(spec::cgroup_path(&id).trim_start_matches('/'))
        .join("memory.events");
    let mut seen = 0;
    loop {
        tokio::time::sleep(OOM_POLL).await;
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        let n = oom_kills(&text);
        if n > seen {
            log::info!("container {id}: OOM kill ({n} so far)");
            seen = n;
            if tx.send(id.clone()).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter() {
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n"),
            2
        );
        assert_eq!(oom_kills(""), 0);
    }
}
