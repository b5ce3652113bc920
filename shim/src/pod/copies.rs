//! The pod's copied files (`volumes::copied`): put into the guest when a container first binds
//! a source, sent again when the source changes on the host, removed with the last container
//! that binds it. One poll per pod compares each source's metadata every [`POLL`]: kubelet
//! updates a configMap by writing a new directory and swapping a symlink, and an in-place
//! write (`/etc/hosts`) moves the ctime, so both show without inotify's per-inode watches,
//! which a symlink swap escapes (Kata's agent polls for the same reason).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cocoon_protocol::agent as ag;
use tokio::task::JoinHandle;

use super::{Inner, Pod};
use crate::guest::GuestLink;
use crate::volumes::copied::{self, Stamp, Uncopyable};
use crate::volumes::Plan;
use crate::{Error, Result};

/// How often sources are compared with what was copied: a host change reaches the guest
/// within this plus one agent call.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Copied {
    source: PathBuf,
    /// Containers that bind it.
    users: usize,
    /// What the guest's copy was made from.
    stamp: Stamp,
    /// The last reason an update could not be copied, logged once.
    stuck: Option<String>,
    /// Written back to the host when its container exits (`copied::copied_back`).
    back: bool,
}

/// The pod's copied sources, by name below `FILES_DIR`, and the poll that keeps them current.
#[derive(Debug, Default)]
pub(super) struct Copies {
    by_name: HashMap<String, Copied>,
    poll: Option<JoinHandle<()>>,
}

impl Copies {
    /// Counts one more container on `name` if the guest has it already.
    fn hold(&mut self, name: &str) -> bool {
        self.by_name.get_mut(name).map(|c| c.users += 1).is_some()
    }

    /// Drops a container's use of `names`; returns those no container uses any more.
    pub(super) fn release(&mut self, names: &[String]) -> Vec<String> {
        let mut gone = vec![];
        for n in names {
            if let Some(c) = self.by_name.get_mut(n) {
                c.users = c.users.saturating_sub(1);
                if c.users == 0 {
                    self.by_name.remove(n);
                    gone.push(n.clone());
                }
            }
        }
        gone
    }

    /// The VM is going: nothing is left to keep current.
    pub(super) fn clear(&mut self) {
        self.by_name.clear();
        if let Some(h) = self.poll.take() {
            h.abort();
        }
    }
}

impl Pod {
    /// Puts the plan's copies into the guest (those the pod has already are shared) and returns
    /// the names the container holds. A source too big to copy becomes a bind of the share
    /// again, logged; on failure nothing is held.
    pub(super) async fn put_copies(
        &self,
        guest: &GuestLink,
        plan: &mut Plan,
        cid: &str,
    ) -> Result<Vec<String>> {
        let mut held: Vec<String> = vec![];
        for c in std::mem::take(&mut plan.copies) {
            if self.with_state(|s| s.copies.hold(&c.name)).await {
                held.push(c.name);
                continue;
            }
            let source = c.bind.source.display().to_string();
            let (entries, stamp) = match copied::read(&c.bind.source) {
                Ok(r) => r,
                Err(Uncopyable::TooBig(why)) => {
                    log::info!(
                        "container {cid}: {source} is too big to copy into the guest ({why}); \
                         shared instead"
                    );
                    plan.binds.push(c.bind);
                    continue;
                }
                Err(Uncopyable::Io(e)) => {
                    self.release_copies(Some(guest), &held).await;
                    return Err(Error::InvalidArgument(format!(
                        "bind mount source {source}: {e}"
                    )));
                }
            };
            let req = ag::PutFilesRequest {
                name: c.name.clone(),
                entries,
                ..Default::default()
            };
            if let Err(e) = put(guest, &req).await {
                self.release_copies(Some(guest), &held).await;
                return Err(e);
            }
            log::debug!(
                "container {cid}: {source} copied into the guest as {}",
                c.name
            );
            let (name, source, back) = (c.name.clone(), c.bind.source, c.back);
            let weak = Arc::downgrade(&self.inner);
            self.with_state(move |s| {
                s.copies.by_name.insert(
                    name,
                    Copied {
                        source,
                        users: 1,
                        stamp,
                        stuck: None,
                        back,
                    },
                );
                if s.copies.poll.is_none() {
                    s.copies.poll = Some(tokio::spawn(poll(weak)));
                }
            })
            .await;
            held.push(c.name);
        }
        Ok(held)
    }

    /// Drops a container's use of `names`, removing from the guest (when it still runs) what
    /// no container binds any more.
    pub(super) async fn release_copies(&self, guest: Option<&GuestLink>, names: &[String]) {
        let gone = self.with_state(|s| s.copies.release(names)).await;
        if let Some(guest) = guest {
            remove_in_guest(guest, &gone).await;
        }
    }
}

impl Pod {
    /// Writes the guest's copy of each file that goes back (kubelet's termination log) of
    /// container `cid` to its host file; its init has exited, and kubelet reads the file once
    /// it hears of the exit, so this runs before the exit is published. At most
    /// `COPY_MAX_BYTES` come back; a failure is logged and leaves the host file as it was.
    pub(super) async fn copy_back(&self, cid: &str) {
        let (guest, back) = self
            .with_state(|s| {
                let names = s
                    .container(cid)
                    .map(|c| c.copies.clone())
                    .unwrap_or_default();
                let back: Vec<(String, PathBuf)> = names
                    .into_iter()
                    .filter_map(|n| {
                        let c = s.copies.by_name.get(&n).filter(|c| c.back)?;
                        Some((n, c.source.clone()))
                    })
                    .collect();
                (s.guest().ok(), back)
            })
            .await;
        let Some(guest) = guest else {
            return;
        };
        for (name, host) in back {
            let req = ag::ReadFileRequest {
                name,
                max_bytes: copied::COPY_MAX_BYTES,
                ..Default::default()
            };
            let read = guest
                .call("read file", guest.agent.read_file(guest.ctx(), &req))
                .await;
            let written = match read {
                Ok(r) => write_back(&host, &r.data).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = written {
                log::warn!("container {cid}: {} not written back: {e}", host.display());
            }
        }
    }
}

/// Overwrites the host file the spec named (never through a symlink in its last component).
fn write_back(host: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(host)?;
    f.write_all(data)
}

/// One PutFiles call, bounded like every call that should be answered at once.
async fn put(guest: &GuestLink, req: &ag::PutFilesRequest) -> Result<()> {
    guest
        .call("put files", guest.agent.put_files(guest.ctx(), req))
        .await
        .map(drop)
}

/// Removes copies from the guest; a failure only leaves a few small files in guest memory.
pub(super) async fn remove_in_guest(guest: &GuestLink, gone: &[String]) {
    for name in gone {
        let req = ag::PutFilesRequest {
            name: name.clone(),
            remove: true,
            ..Default::default()
        };
        if let Err(e) = put(guest, &req).await {
            log::warn!("removing the guest's copy {name}: {e}");
        }
    }
}

/// The pod's poll: ends with the pod, or when its VM goes ([`Copies::clear`] aborts it).
async fn poll(pod: Weak<Inner>) {
    loop {
        tokio::time::sleep(POLL).await;
        let Some(inner) = pod.upgrade() else {
            return;
        };
        Pod { inner }.refresh_copies().await;
    }
}

impl Pod {
    /// Sends again every source whose metadata moved since its copy was made.
    async fn refresh_copies(&self) {
        let (guest, due) = self
            .with_state(|s| {
                let due: Vec<(String, PathBuf, Stamp)> = s
                    .copies
                    .by_name
                    .iter()
                    .map(|(n, c)| (n.clone(), c.source.clone(), c.stamp.clone()))
                    .collect();
                (s.guest().ok(), due)
            })
            .await;
        let Some(guest) = guest else {
            return;
        };
        for (name, source, old) in due {
            let read = match copied::stamp(&source) {
                Ok(now) if now == old => continue,
                // kubelet removes a pod's volumes as the pod goes: nothing to update.
                Err(Uncopyable::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Ok(_) | Err(_) => copied::read(&source),
            };
            let outcome = match read {
                Ok((entries, stamp)) => {
                    let req = ag::PutFilesRequest {
                        name: name.clone(),
                        entries,
                        ..Default::default()
                    };
                    put(&guest, &req)
                        .await
                        .map(|()| stamp)
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("{e}; the guest keeps the last copy")),
            };
            self.with_state(|s| {
                let Some(c) = s.copies.by_name.get_mut(&name) else {
                    return;
                };
                match outcome {
                    Ok(stamp) => {
                        log::info!("{}: updated in the guest", source.display());
                        c.stamp = stamp;
                        c.stuck = None;
                    }
                    Err(why) if c.stuck.as_ref() != Some(&why) => {
                        log::warn!("{}: not updated in the guest: {why}", source.display());
                        c.stuck = Some(why);
                    }
                    Err(_) => {}
                }
            })
            .await;
        }
    }
}
