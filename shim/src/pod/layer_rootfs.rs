//! Container rootfs as layer disks (issue #29): where containerd hands the shim an overlay of
//! image layers whose writable layer is still empty, each layer becomes a read-only EROFS
//! image from the host's cache ([`crate::layers::LayerCache`]), plugged into the VM as a SCSI
//! LUN (`vmm_driver::DiskHotplug`), and the agent assembles the rootfs in the guest: the
//! layers under an overlay whose writable layer is the container's own scratch disk (or a
//! tmpfs).
//!
//! Nothing of such a rootfs is mounted on the host, so nothing the guest writes ever meets a
//! host mount; and reads don't cross FUSE. A pod plugs each image once, whatever number of its
//! containers use it, and takes it out when the last of them is deleted. Any other rootfs (a
//! bind, a bundle directory, a snapshot that already holds writes, a layer erofs-utils can't
//! image faithfully, a VMM that can't add disks) goes over the share as before; the reason is
//! logged at create.

use std::path::{Path, PathBuf};

use cocoon_protocol::agent as ag;

use super::{Pod, PodState};
use crate::layers::LayerUse;
use crate::rootfs::RootfsSource;
use crate::{Error, Result};

/// The disks a pod has plugged in, by image path: LUN and number of containers using it.
pub(super) type Disks = std::collections::HashMap<PathBuf, (u32, usize)>;

/// Where layer images come from and how large a writable layer may grow (the config's
/// `[rootfs]`).
#[derive(Debug, Clone)]
pub struct LayerPolicy {
    pub cache: crate::layers::LayerCache,
    /// Where each container's writes go: its own scratch disk, or (`None`) a tmpfs in the
    /// guest.
    pub scratch: Option<crate::layers::ScratchMaker>,
    /// The tmpfs's bound; 0: the guest kernel's default, half the guest's memory.
    pub upper_size_bytes: u64,
}

/// A scratch disk's size when the config leaves it open: sparse, so only what the guest
/// writes takes room on the host.
const DEFAULT_SCRATCH_MIB: u64 = 10 << 10;

impl LayerPolicy {
    /// The config's `[rootfs]`: `None` where every rootfs goes over the share. Must run
    /// inside the shim's runtime: builds run `mkfs` through the shim's reaper
    /// (`crate::child`).
    pub fn from_config(cfg: &vmm_driver::Config) -> Result<Option<LayerPolicy>> {
        use vmm_driver::config::{RootfsMode, UpperMode};
        if cfg.rootfs.mode != RootfsMode::Layers {
            return Ok(None);
        }
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::io("layer rootfs", std::io::Error::other(e)))?;
        // Builds run on a blocking thread; the shim's reaper may take mkfs's status.
        let run: crate::layers::Runner = std::sync::Arc::new(move |cmd| {
            handle.block_on(crate::child::run(
                cmd.into(),
                "mkfs",
                b"",
                std::time::Duration::from_secs(600),
            ))
        });
        let paths = &cfg.paths;
        let mkfs = vmm_driver::resolve_binary("mkfs.erofs", "paths.mkfs_erofs", &paths.mkfs_erofs)?;
        let cache = crate::layers::LayerCache::open(&cfg.rootfs.layer_cache_dir, mkfs)?
            .with_runner(run.clone());
        let scratch = match cfg.rootfs.upper {
            UpperMode::Memory => None,
            UpperMode::Disk => {
                let mkfs =
                    vmm_driver::resolve_binary("mkfs.ext4", "paths.mkfs_ext4", &paths.mkfs_ext4)?;
                let mib = match cfg.rootfs.upper_size_mib {
                    0 => DEFAULT_SCRATCH_MIB,
                    n => n,
                };
                let dir = &cfg.rootfs.scratch_dir;
                Some(crate::layers::ScratchMaker::new(dir, mib << 20, mkfs, run)?)
            }
        };
        Ok(Some(LayerPolicy {
            cache,
            scratch,
            upper_size_bytes: cfg.rootfs.upper_size_mib << 20,
        }))
    }
}

/// A container rootfs the guest assembles.
#[derive(Debug)]
pub(super) struct Assembled {
    pub request: ag::LayerRootfs,
    pub disks: LayerUse,
}

/// The layers of `source`, topmost first, if it is one overlay of image layers with an empty
/// writable layer; otherwise why it is not, for the log.
pub fn layers_of(source: &RootfsSource) -> std::result::Result<Vec<PathBuf>, String> {
    let [m] = &source.mounts[..] else {
        return Err(match source.mounts.len() {
            0 => "the bundle brings its own rootfs directory".into(),
            n => format!("containerd gave {n} rootfs mounts"),
        });
    };
    if m.type_ != "overlay" {
        return Err(format!("the rootfs is a {} mount", m.type_));
    }
    let option = |key: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    };
    let lowers: Vec<PathBuf> = option("lowerdir")
        .ok_or("the overlay has no lowerdir")?
        .split(':')
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    if lowers.is_empty() || lowers.iter().any(|l| !l.is_absolute()) {
        return Err("the overlay's lowerdir is not a list of absolute paths".into());
    }
    if let Some(upper) = option("upperdir") {
        let empty = std::fs::read_dir(upper)
            .map_err(|e| format!("the overlay's upperdir {upper}: {e}"))?
            .next()
            .is_none();
        if !empty {
            return Err(format!(
                "the snapshot's writable layer {upper} already holds files"
            ));
        }
    }
    Ok(lowers)
}

impl Pod {
    /// Plugs in the layer disks of `req`'s rootfs that the pod doesn't have yet, if this pod
    /// can and the rootfs is made of layers; `None` means the share serves it.
    pub(super) async fn plug_layers(
        &self,
        id: &str,
        spec: &serde_json::Value,
        source: &RootfsSource,
    ) -> Result<Option<Assembled>> {
        if crate::annotations::rootfs_on_share(spec).map_err(Error::InvalidArgument)? {
            log::info!(
                "container {id}: rootfs over virtio-fs ({}=virtio-fs)",
                crate::annotations::ROOTFS
            );
            return Ok(None);
        }
        let disks = self
            .with_state(|s| s.vm.as_ref().and_then(|vm| vm.disk_hotplug()))
            .await;
        let Some(disks) = disks else {
            log::info!("container {id}: rootfs over virtio-fs (the VMM can't add disks)");
            return Ok(None);
        };
        let lowers = match layers_of(source) {
            Ok(l) => l,
            Err(why) => {
                log::info!("container {id}: rootfs over virtio-fs ({why})");
                return Ok(None);
            }
        };
        // The config's choice last: it reads the config file and checks the cache's directory,
        // which a rootfs that can't be layers never needs.
        let Some(policy) = self.inner.factory.layer_policy() else {
            return Ok(None);
        };
        let cache = policy.cache;
        let t0 = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            lowers
                .iter()
                .map(|l| cache.image_for(l).map(|r| r.map_err(|u| (l.clone(), u))))
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| Error::io("build layer images", std::io::Error::other(e)))??;
        let t_images = t0.elapsed();
        let mut images = vec![];
        for b in built {
            match b {
                Ok(img) => images.push(img),
                Err((_, why)) => {
                    log::info!("container {id}: rootfs over virtio-fs ({})", why.0);
                    return Ok(None);
                }
            }
        }
        let mut assembled = Assembled {
            request: ag::LayerRootfs {
                upper_size_bytes: policy.upper_size_bytes,
                ..Default::default()
            },
            disks: LayerUse::default(),
        };
        let plugged = self
            .plug_all(id, &images, policy.scratch, disks.as_ref(), &mut assembled)
            .await;
        if let Err(e) = plugged {
            self.release_layers(&assembled.disks).await;
            return Err(e);
        }
        let cold = images.iter().filter(|i| i.built).count();
        log::info!(
            "container {id}: rootfs from {} layer disks ({cold} images built now; images {} ms, \
             plugged in {} ms), writes on {}",
            images.len(),
            t_images.as_millis(),
            (t0.elapsed() - t_images).as_millis(),
            match assembled.disks.scratch {
                Some(_) => "a scratch disk",
                None => "a tmpfs",
            }
        );
        Ok(Some(assembled))
    }

    /// Plugs in (or takes another use of) each image, then the container's scratch disk,
    /// recording each in `into` as it goes.
    async fn plug_all(
        &self,
        id: &str,
        images: &[crate::layers::LayerImage],
        scratch: Option<crate::layers::ScratchMaker>,
        disks: &dyn vmm_driver::DiskHotplug,
        into: &mut Assembled,
    ) -> Result<()> {
        for img in images {
            let lun = self.take_disk(&img.path, disks).await?;
            into.disks.images.push(img.path.clone());
            into.request.layers.push(ag::LayerDisk {
                lun,
                ..Default::default()
            });
        }
        if let Some(maker) = scratch {
            let made = tokio::task::spawn_blocking(move || maker.make())
                .await
                .map_err(|e| Error::io("make a scratch disk", std::io::Error::other(e)))??;
            let lun = disks
                .add_scratch(&made, &format!("scratch-{id}"))
                .await
                .map_err(Error::Vmm)?;
            // QEMU holds the only reference now: the file goes when the VM lets go of it.
            drop(made);
            into.disks.scratch = Some(lun);
            into.request.scratch_lun = lun;
        }
        Ok(())
    }

    /// The LUN of `image` in the pod's VM, plugging it in for its first user.
    async fn take_disk(&self, image: &Path, disks: &dyn vmm_driver::DiskHotplug) -> Result<u32> {
        let known = self
            .with_state(|s| {
                s.disks.get_mut(image).map(|(lun, users)| {
                    *users += 1;
                    *lun
                })
            })
            .await;
        if let Some(lun) = known {
            return Ok(lun);
        }
        let file = std::fs::File::open(image)
            .map_err(|e| Error::io(format!("open layer image {}", image.display()), e))?;
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lun = disks.add_disk(&file, &name).await.map_err(Error::Vmm)?;
        self.with_state(|s| s.disks.insert(image.to_owned(), (lun, 1)))
            .await;
        Ok(lun)
    }

    /// Drops a container's use of its disks, taking out its scratch disk and the images nobody
    /// uses any more (the guest unmounted them when it removed the container).
    pub(super) async fn release_layers(&self, used: &LayerUse) {
        let (gone, disks) = self
            .with_state(|s| {
                let mut gone = s.release_disks(&used.images);
                gone.extend(used.scratch);
                (gone, s.vm.as_ref().and_then(|vm| vm.disk_hotplug()))
            })
            .await;
        let Some(disks) = disks else {
            return;
        };
        for lun in gone {
            if let Err(e) = disks.remove_disk(lun).await {
                log::warn!("removing layer disk LUN {lun}: {e}");
            }
        }
    }
}

impl PodState {
    /// Counts one use less of each image; returns the LUNs left unused.
    fn release_disks(&mut self, images: &[PathBuf]) -> Vec<u32> {
        let mut gone = vec![];
        for img in images {
            if let Some((lun, users)) = self.disks.get_mut(img) {
                *users -= 1;
                if *users == 0 {
                    gone.push(*lun);
                    self.disks.remove(img);
                }
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::api;

    fn overlay(options: &[&str]) -> RootfsSource {
        RootfsSource {
            mounts: vec![api::Mount {
                type_: "overlay".into(),
                source: "overlay".into(),
                options: options.iter().map(|o| o.to_string()).collect(),
                ..Default::default()
            }],
            bundle_rootfs: "/b/rootfs".into(),
        }
    }

    #[test]
    fn only_an_overlay_of_layers_with_an_empty_upper_becomes_layer_disks() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("fs");
        std::fs::create_dir(&upper).unwrap();
        let up = format!("upperdir={}", upper.display());
        let src = overlay(&[
            "index=off",
            "workdir=/s/2/work",
            &up,
            "lowerdir=/s/2/fs:/s/1/fs",
        ]);
        assert_eq!(
            layers_of(&src).unwrap(),
            [PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        // A read-only view has no upper at all.
        assert_eq!(layers_of(&overlay(&["lowerdir=/s/1/fs"])).unwrap().len(), 1);

        std::fs::write(upper.join("written"), "x").unwrap();
        let why = layers_of(&src).unwrap_err();
        assert!(why.contains("already holds files"), "{why}");
        let bind = RootfsSource {
            mounts: vec![api::Mount {
                type_: "bind".into(),
                ..Default::default()
            }],
            bundle_rootfs: "/b/rootfs".into(),
        };
        assert!(layers_of(&bind).unwrap_err().contains("bind"));
        let own = RootfsSource {
            mounts: vec![],
            bundle_rootfs: "/b/rootfs".into(),
        };
        assert!(layers_of(&own).unwrap_err().contains("own rootfs"));
        assert!(layers_of(&overlay(&["lowerdir=rel/fs"])).is_err());
        assert!(layers_of(&overlay(&["upperdir=/x"])).is_err());
    }
}
