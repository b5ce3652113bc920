//! The pod's volume binds, reference-counted: a source that several containers bind the same
//! way (CRI's per-pod `/etc/hosts` and `resolv.conf`, a volume mounted by every container of a
//! pod) is bound once on the host and served once by virtiofsd, as Kata shares them.
//!
//! The key is the source path with its (device, inode) when planned, and the bind's `ro`, `rro`
//! and `rbind`: a file replaced under the same name gets a bind of its own, as a fresh bind under
//! runc would see the new file, and a read-only use never shares a writable bind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::Bind;

/// The slots' directory in the host-only tree, next to the containers' own. A container id
/// can't be this: containerd's identifiers start with a letter or digit.
pub const SLOTS_DIR: &str = "_volumes";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    source: PathBuf,
    inode: (u64, u64),
    recursive: bool,
    readonly: bool,
    recursive_readonly: bool,
}

#[derive(Debug)]
struct Slot {
    /// `<host tree>/_volumes/<n>`; the guest sees it at the same place below the share.
    path: PathBuf,
    users: usize,
}

/// Which binds the pod holds, and for how many containers.
#[derive(Debug, Default)]
pub struct Slots {
    next: usize,
    held: HashMap<Key, Slot>,
}

impl Slots {
    /// Takes one use, in the host tree at `root`, of the slot for `b`; returns its path, and
    /// whether it is new (the caller then binds it, or [`Slots::release`]s it on failure).
    pub fn acquire(&mut self, root: &Path, b: &Bind) -> (PathBuf, bool) {
        let key = Key {
            source: b.source.clone(),
            inode: b.inode,
            recursive: b.recursive,
            readonly: b.readonly,
            recursive_readonly: b.recursive_readonly,
        };
        if let Some(slot) = self.held.get_mut(&key) {
            slot.users += 1;
            return (slot.path.clone(), false);
        }
        let path = root.join(SLOTS_DIR).join(self.next.to_string());
        self.next += 1;
        self.held.insert(
            key,
            Slot {
                path: path.clone(),
                users: 1,
            },
        );
        (path, true)
    }

    /// Drops one use of each slot in `paths`; returns those nobody uses any more, in reverse
    /// order, for the caller to unmount.
    pub fn release(&mut self, paths: &[PathBuf]) -> Vec<PathBuf> {
        let mut gone = vec![];
        for path in paths.iter().rev() {
            let Some(key) = self
                .held
                .iter()
                .find(|(_, s)| &s.path == path)
                .map(|(k, _)| k.clone())
            else {
                continue;
            };
            let last = self.held.get_mut(&key).is_some_and(|s| {
                s.users -= 1;
                s.users == 0
            });
            if last {
                self.held.remove(&key);
                gone.push(path.clone());
            }
        }
        gone
    }

    /// Every slot still held (for `state.json`).
    pub fn held(&self) -> impl Iterator<Item = &Path> {
        self.held.values().map(|s| s.path.as_path())
    }

    /// Forgets every slot, returning them for the caller to unmount.
    pub fn drain(&mut self) -> Vec<PathBuf> {
        self.held.drain().map(|(_, s)| s.path).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(source: &str, inode: u64, readonly: bool) -> Bind {
        Bind {
            source: source.into(),
            inode: (1, inode),
            is_dir: true,
            recursive: true,
            readonly,
            recursive_readonly: false,
            mount: 0,
        }
    }

    #[test]
    fn one_bind_per_source_and_mode_until_its_last_user_goes() {
        let mut s = Slots::default();
        let root = PathBuf::from("/run/sb/mounts");
        let (hosts, new) = s.acquire(&root, &bind("/pod/hosts", 7, true));
        assert!(new);
        assert_eq!(hosts, root.join("_volumes/0"));
        assert_eq!(
            s.acquire(&root, &bind("/pod/hosts", 7, true)),
            (hosts.clone(), false)
        );
        // Writable, or the file replaced under its name: a bind of its own.
        let (rw, new_rw) = s.acquire(&root, &bind("/pod/hosts", 7, false));
        let (replaced, new_replaced) = s.acquire(&root, &bind("/pod/hosts", 8, true));
        assert!(new_rw && new_replaced);
        assert_ne!(rw, hosts);
        assert_ne!(replaced, hosts);

        assert_eq!(s.release(&[hosts.clone(), rw.clone()]), vec![rw]);
        assert_eq!(s.held().count(), 2);
        assert_eq!(s.release(std::slice::from_ref(&hosts)), vec![hosts]);
        assert_eq!(
            s.release(&[root.join("_volumes/99")]),
            Vec::<PathBuf>::new()
        );
        assert_eq!(s.drain(), vec![replaced]);
        // Names are never reused: a stale guest handle can't reach a newer volume.
        assert_eq!(
            s.acquire(&root, &bind("/a", 1, false)).0,
            root.join("_volumes/3")
        );
    }
}
