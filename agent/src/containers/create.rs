//! CreateContainer: checks the rootfs, adapts the spec into a bundle, and launches the init
//! process (stopped until StartContainer). A failed create leaves nothing behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cocoon_protocol::agent::{LayerRootfs, StdioStreams};
use cocoon_protocol::ProcessRef;

use super::delete::delete_state;
use super::oom::watch_oom;
use super::{check_id, failed, Container, Failure, Manager, Res};
use crate::runner::Job;
use crate::spec;

/// Where the agent writes bundles (config.json, exec process files, runner results).
const BUNDLES: &str = "/run/cocoon/bundles";

/// Where a container's rootfs comes from.
#[derive(Debug, Clone, Copy)]
pub enum RootfsFrom<'a> {
    /// A directory on the virtio-fs share, relative to it (`<container>/rootfs`).
    Share(&'a str),
    /// Layer disks, assembled in the guest ([`super::layers`]).
    Layers(&'a LayerRootfs),
}

impl Manager {
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: RootfsFrom<'_>,
        stdio: &StdioStreams,
    ) -> Res<i32> {
        check_id("container", id)?;
        if self.get(id).is_ok() {
            return Err(Failure::Exists(format!("container {id:?} already exists")));
        }
        let result = self.try_create(id, spec_json, rootfs, stdio).await;
        if result.is_err() {
            // Unclaimed streams, the bundle and any half-made libcontainer state would
            // otherwise block a retry under the same id.
            self.hub.discard(&ProcessRef::init(id));
            let _ = std::fs::remove_dir_all(Path::new(BUNDLES).join(id));
            let _ = tokio::task::spawn_blocking({
                let id = id.to_owned();
                move || delete_state(&id)
            })
            .await;
            self.layers.disassemble(id);
        }
        result
    }

    /// The steps of [`Manager::create`] that may fail, leaving cleanup to the caller.
    async fn try_create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: RootfsFrom<'_>,
        stdio: &StdioStreams,
    ) -> Res<i32> {
        let root = match rootfs {
            RootfsFrom::Share(rel) => resolve_rootfs(&self.share, rel)?,
            RootfsFrom::Layers(l) => {
                let layers = self.layers.clone();
                let (id, l) = (id.to_owned(), l.clone());
                // Mounting waits for the disks to appear: not on the runtime's thread.
                super::blocking(move || layers.assemble(&id, &l)).await?
            }
        };
        let pod = self.pod_holder(spec_json);
        let mut spec = spec::adapt(spec_json, id, &root, pod, |p| Path::new(p).exists())
            .map_err(|e| Failure::Invalid(e.0))?;
        for (key, value) in spec::take_net_sysctls(&mut spec).map_err(|e| Failure::Invalid(e.0))? {
            std::fs::write(spec::sysctl_path(&key), &value).map_err(|e| {
                Failure::Invalid(format!(
                    "sysctl {key}={value:?} in the pod's network namespace: {e}"
                ))
            })?;
            log::info!("container {id}: sysctl {key}={value} (pod network namespace)");
        }
        let bundle = Path::new(BUNDLES).join(id);
        std::fs::create_dir_all(&bundle).map_err(failed("create the bundle"))?;
        std::fs::write(bundle.join("config.json"), spec.to_string())
            .map_err(failed("write config.json"))?;
        let job = Job::Create {
            id: id.to_owned(),
            bundle: bundle.clone(),
        };
        let kill_rest = spec::init_exit_leaves_others(&spec).then(|| {
            PathBuf::from("/sys/fs/cgroup")
                .join(spec::cgroup_path(id).trim_start_matches('/'))
                .join("cgroup.kill")
        });
        let init = self
            .launch(&ProcessRef::init(id), &bundle, job, stdio, kill_rest)
            .await?;
        let pid = init.pid;
        let oom_watch = tokio::spawn(watch_oom(id.to_owned(), self.oom_tx.clone()));
        let c = Container {
            bundle,
            init,
            execs: Mutex::new(HashMap::new()),
            oom_watch,
        };
        self.table().insert(id.to_owned(), Arc::new(c));
        log::info!("container {id} created (init pid {pid})");
        Ok(pid)
    }
}

impl Manager {
    /// For a container of a CRI pod, the guest pid of its sandbox (pause) container, whose
    /// namespaces it joins where the spec names the sandbox's: the pod shares IPC and UTS (the
    /// pod's hostname), as under runc.
    fn pod_holder(&self, spec_json: &[u8]) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_slice(spec_json).ok()?;
        let ann = &v["annotations"];
        if ann["io.kubernetes.cri.container-type"] != "container" {
            return None;
        }
        let sandbox = ann["io.kubernetes.cri.sandbox-id"].as_str()?;
        let pid = self.table().get(sandbox).map(|c| c.init.pid);
        if pid.is_none() {
            log::warn!(
                "pod sandbox {sandbox} is not a container here: its namespaces can't be joined"
            );
        }
        pid
    }
}

/// Mounts a tmpfs of the asked size at each volume's path that has none yet (kubelet's memory
/// emptyDirs, shared by the pod: the first container that names one creates it). Each must be
/// one name below `EPHEMERAL_DIR`.
pub fn provide_ephemeral(volumes: &[cocoon_protocol::agent::EphemeralVolume]) -> Res<()> {
    use nix::mount::MsFlags;
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for v in volumes {
        let d = &v.path;
        let name = d
            .strip_prefix(cocoon_protocol::EPHEMERAL_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or("");
        let one_name = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        if !one_name {
            return Err(Failure::Invalid(format!(
                "ephemeral volume {d:?} is not one name below {}",
                cocoon_protocol::EPHEMERAL_DIR
            )));
        }
        if mounted
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(d.as_str()))
        {
            continue;
        }
        std::fs::create_dir_all(d).map_err(failed("create an ephemeral volume"))?;
        let data = match v.size_bytes {
            0 => "mode=0777".to_owned(),
            n => format!("mode=0777,size={n}"),
        };
        nix::mount::mount(
            Some("tmpfs"),
            d.as_str(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|e| Failure::Failed(format!("mount a tmpfs at {d}: {e}")))?;
        log::info!("ephemeral volume {d}: guest tmpfs ({data})");
    }
    Ok(())
}

/// Reaches each host submount below a volume (`CreateContainerRequest.submounts`) on the
/// share, so that virtio-fs mounts it here, with the share's flags and its own, before the
/// container's bind of the volume copies it; reached first through that bind, it would take
/// the bind's `ro`. Only paths on the share are touched; one that is gone is skipped.
pub fn reach_submounts(paths: &[String]) {
    for p in paths {
        let path = Path::new(p);
        let on_share = path.starts_with(crate::init::SHARED_MOUNT)
            && !path
                .components()
                .any(|c| c == std::path::Component::ParentDir);
        if !on_share {
            log::warn!("not reaching {p}: not a path on the share");
            continue;
        }
        if let Err(e) = std::fs::metadata(path) {
            log::warn!("submount {p}: {e}");
        }
    }
}

/// Where a container's rootfs lives, refusing anything that leaves the share.
fn resolve_rootfs(share: &Path, rel: &str) -> Res<PathBuf> {
    let p = Path::new(rel);
    let escapes = rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)));
    if escapes {
        return Err(Failure::Invalid(format!(
            "rootfs {rel:?} is outside the shared directory: give a path relative to the share, like <container>/rootfs"
        )));
    }
    let full = share.join(p);
    let real = full.canonicalize().map_err(|_| {
        Failure::NotFound(format!(
            "rootfs {rel:?} does not exist on the share ({})",
            full.display()
        ))
    })?;
    let share_real = share.canonicalize().map_err(failed("resolve the share"))?;
    if !real.starts_with(&share_real) {
        return Err(Failure::Invalid(format!(
            "rootfs {rel:?} resolves outside the shared directory"
        )));
    }
    if !real.is_dir() {
        return Err(Failure::Invalid(format!(
            "rootfs {rel:?} is not a directory"
        )));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_must_stay_inside_the_share() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(share.path().join("c1/rootfs")).unwrap();
        std::os::unix::fs::symlink("/", share.path().join("escape")).unwrap();
        assert!(resolve_rootfs(share.path(), "c1/rootfs").is_ok());
        for bad in ["/etc", "../x", "c1/../../x", "", "escape"] {
            assert!(
                matches!(resolve_rootfs(share.path(), bad), Err(Failure::Invalid(_))),
                "{bad:?} should be refused"
            );
        }
        assert!(matches!(
            resolve_rootfs(share.path(), "c2/rootfs"),
            Err(Failure::NotFound(_))
        ));
    }
}
