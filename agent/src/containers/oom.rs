//! OOM kills: one watcher per container reads its cgroup's `memory.events` each time the
//! kernel says it changed (inotify, as runc does for cgroup v2), and GetOOMEvent long-polls
//! for the next kill in any container.
//!
//! Polling the file instead woke every container's watcher ten times a second; under TCG each
//! wake-up is emulated work that an idle pod (and every other pod sharing the host's cores)
//! pays for.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use tokio::sync::mpsc;

use super::{Failure, Manager, Res};
use crate::spec;

/// How often memory.events is read where inotify can't watch it.
const OOM_POLL: Duration = Duration::from_millis(100);

/// Changes to one file, from inotify: the kernel notifies `memory.events` whenever one of its
/// counters moves.
struct Changes(EventStream<[u8; 1024]>);

impl Changes {
    fn watch(path: &Path) -> std::io::Result<Changes> {
        let inotify = Inotify::init()?;
        inotify.watches().add(path, WatchMask::MODIFY)?;
        Ok(Changes(inotify.into_event_stream([0u8; 1024])?))
    }

    /// Waits for the next change; `false` once the watch is gone.
    async fn next(&mut self) -> bool {
        matches!(self.0.next().await, Some(Ok(_)))
    }
}

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
    // Watched before the first read, so that no kill falls between the two.
    let mut changes = Changes::watch(&path)
        .inspect_err(|e| {
            log::warn!(
                "container {id}: cannot watch {} ({e}); polling it",
                path.display()
            )
        })
        .ok();
    let mut seen = 0;
    loop {
        if let Ok(text) = tokio::fs::read_to_string(&path).await {
            let n = oom_kills(&text);
            if n > seen {
                log::info!("container {id}: OOM kill ({n} so far)");
                seen = n;
                if tx.send(id.clone()).is_err() {
                    return;
                }
            }
        }
        match &mut changes {
            Some(c) => {
                if !c.next().await {
                    // A watch that failed is not polled again: the file is, from now on.
                    changes = None;
                }
            }
            None => tokio::time::sleep(OOM_POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_to_the_watched_file_wakes_the_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.events");
        std::fs::write(&path, "oom_kill 0\n").unwrap();
        let mut changes = Changes::watch(&path).unwrap();
        // Nothing changed yet: no wake-up.
        let quiet = tokio::time::timeout(Duration::from_millis(100), changes.next()).await;
        assert!(quiet.is_err(), "woke without a change");
        std::fs::write(&path, "oom_kill 1\n").unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), changes.next()).await;
        assert_eq!(woke, Ok(true), "no wake-up after a write");
    }

    #[test]
    fn oom_kill_counter() {
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n"),
            2
        );
        assert_eq!(oom_kills(""), 0);
    }
}
