//! PutFiles: the host's small per-pod files, copied in rather than shared (issue #29). The
//! shim sends a source's whole tree (`/etc/hosts`, `resolv.conf`, `hostname`, kubelet's
//! configMap, secret, projected and downward-API volumes) when a container first binds it and
//! again when it changes on the host; containers bind `FILES_DIR/<name>`.
//!
//! How an update lands is what a reader of the old copy needs:
//! - a file copied on its own is rewritten in place: a container's bind mount holds its inode,
//!   so a new inode would never be seen (a runc container sees an in-place host write too);
//! - in a directory, each changed file and symlink is written beside its name and renamed over
//!   it, so a reader sees the old or the new content, never half; kubelet's `..data` symlink
//!   swap then lands as one rename, as it does on the host. Unchanged files are left alone.
//!
//! Entries the host no longer has are removed after the new ones are in place.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use cocoon_protocol::agent::{FileEntry, FileKind, PutFilesRequest};

use super::{check_id, failed, Failure, Res};

/// Applies one PutFiles request below `FILES_DIR`.
pub fn put_files(req: &PutFilesRequest) -> Res<()> {
    put_in(Path::new(cocoon_protocol::FILES_DIR), req)
}

/// The first `max` bytes of the copied file `name` (a file copied on its own).
pub fn read_file(name: &str, max: u64) -> Res<Vec<u8>> {
    read_in(Path::new(cocoon_protocol::FILES_DIR), name, max)
}

fn read_in(base: &Path, name: &str, max: u64) -> Res<Vec<u8>> {
    use std::io::Read;
    check_id("copied files", name)?;
    let f = std::fs::File::open(base.join(name)).map_err(failed("open a copied file"))?;
    let mut data = vec![];
    f.take(max)
        .read_to_end(&mut data)
        .map_err(failed("read a copied file"))?;
    Ok(data)
}

fn invalid(m: String) -> Failure {
    Failure::Invalid(m)
}

fn put_in(base: &Path, req: &PutFilesRequest) -> Res<()> {
    let name = req.name.as_str();
    // The shim names a copy like an id (`volumes::copied::name_for`): one plain name.
    check_id("copied files", name)?;
    let top = base.join(name);
    if req.remove {
        remove_any(&top).map_err(failed("remove copied files"))?;
        return Ok(());
    }
    let Some(root) = req.entries.first().filter(|e| e.path.is_empty()) else {
        return Err(invalid(format!(
            "copied files {name}: the first entry is not the top"
        )));
    };
    std::fs::create_dir_all(base).map_err(failed("create the copied files' directory"))?;
    match root.kind.enum_value_or_default() {
        FileKind::REGULAR if req.entries.len() == 1 => write_in_place(&top, root),
        FileKind::REGULAR => Err(invalid(format!("copied file {name}: entries below a file"))),
        FileKind::DIRECTORY => put_tree(&top, &req.entries),
        FileKind::SYMLINK => Err(invalid(format!(
            "copied files {name}: the top is a symlink"
        ))),
    }
}

/// A relative path of plain names only: no way out of the copy.
fn relative(path: &str) -> Res<PathBuf> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid(format!(
            "copied file path {path:?} is not a plain relative path"
        )));
    }
    Ok(p.to_path_buf())
}

fn put_tree(top: &Path, entries: &[FileEntry]) -> Res<()> {
    let io = |what: &'static str| failed(what);
    match std::fs::symlink_metadata(top) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            remove_any(top).map_err(io("replace a copied file by a directory"))?;
            std::fs::create_dir(top).map_err(io("create a copied directory"))?;
        }
        Err(_) => std::fs::create_dir(top).map_err(io("create a copied directory"))?,
    }
    set_owner_and_mode(top, &entries[0]).map_err(io("set a copied directory's owner"))?;
    // Every entry's parent must be a directory of this request: a symlink in the tree can't
    // lead a write out of the copy.
    let mut dirs: HashSet<PathBuf> = HashSet::from([PathBuf::new()]);
    let mut wanted: HashSet<PathBuf> = HashSet::new();
    for e in &entries[1..] {
        let rel = relative(&e.path)?;
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if !dirs.contains(&parent) {
            return Err(invalid(format!(
                "copied file {}: its parent is not a directory sent before it",
                e.path
            )));
        }
        let at = top.join(&rel);
        match e.kind.enum_value_or_default() {
            FileKind::DIRECTORY => {
                if !std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                    remove_any(&at).map_err(io("replace a copied entry"))?;
                    std::fs::create_dir(&at).map_err(io("create a copied directory"))?;
                }
                set_owner_and_mode(&at, e).map_err(io("set a copied directory's owner"))?;
                dirs.insert(rel.clone());
            }
            FileKind::REGULAR => {
                if !same_file(&at, e) {
                    let tmp = beside(&at);
                    write_in_place(&tmp, e)?;
                    replace(&tmp, &at)?;
                }
            }
            FileKind::SYMLINK => {
                if std::fs::read_link(&at).ok().as_deref() != Some(Path::new(&e.target)) {
                    let tmp = beside(&at);
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(&e.target, &tmp)
                        .map_err(io("create a copied symlink"))?;
                    std::os::unix::fs::lchown(&tmp, Some(e.uid), Some(e.gid))
                        .map_err(io("set a copied symlink's owner"))?;
                    replace(&tmp, &at)?;
                }
            }
        }
        wanted.insert(rel);
    }
    prune(top, Path::new(""), &wanted).map_err(io("remove what the host removed"))
}

/// `dir/.cocoon-new.<name>`: where a new version is written before it is renamed over `at`.
fn beside(at: &Path) -> PathBuf {
    let name = at
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    at.with_file_name(format!(".cocoon-new.{name}"))
}

/// Renames `tmp` over `at`; a directory at `at` (the host replaced one by a file) goes first.
fn replace(tmp: &Path, at: &Path) -> Res<()> {
    if std::fs::symlink_metadata(at).is_ok_and(|m| m.is_dir()) {
        remove_any(at).map_err(failed("replace a copied directory"))?;
    }
    std::fs::rename(tmp, at).map_err(failed("put a copied file in place"))
}

/// Whether `at` is a regular file with `e`'s content, mode and owner already.
fn same_file(at: &Path, e: &FileEntry) -> bool {
    let Ok(m) = std::fs::symlink_metadata(at) else {
        return false;
    };
    m.is_file()
        && m.len() == e.data.len() as u64
        && m.mode() & 0o7777 == e.mode & 0o7777
        && (m.uid(), m.gid()) == (e.uid, e.gid)
        && std::fs::read(at).is_ok_and(|d| d == e.data)
}

/// Writes a regular file's content into the inode at `at` (created if absent).
fn write_in_place(at: &Path, e: &FileEntry) -> Res<()> {
    if std::fs::symlink_metadata(at).is_ok_and(|m| !m.is_file()) {
        remove_any(at).map_err(failed("replace a copied entry"))?;
    }
    std::fs::write(at, &e.data).map_err(failed("write a copied file"))?;
    set_owner_and_mode(at, e).map_err(failed("set a copied file's owner"))
}

fn set_owner_and_mode(at: &Path, e: &FileEntry) -> std::io::Result<()> {
    std::os::unix::fs::lchown(at, Some(e.uid), Some(e.gid))?;
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(e.mode & 0o7777))
}

/// Removes every entry below `top/rel` that is not `wanted` (nor a parent of one).
fn prune(top: &Path, rel: &Path, wanted: &HashSet<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(top.join(rel))? {
        let entry = entry?;
        let r = rel.join(entry.file_name());
        if !wanted.contains(&r) {
            remove_any(&top.join(&r))?;
        } else if entry.file_type()?.is_dir() {
            prune(top, &r, wanted)?;
        }
    }
    Ok(())
}

/// Removes a file, symlink or directory tree; absent is fine.
fn remove_any(p: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: FileKind, data: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: kind.into(),
            mode: if kind == FileKind::DIRECTORY {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            data: if kind == FileKind::REGULAR {
                data.as_bytes().to_vec()
            } else {
                vec![]
            },
            target: if kind == FileKind::SYMLINK {
                data.into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    fn put(base: &Path, name: &str, entries: Vec<FileEntry>) -> Res<()> {
        put_in(
            base,
            &PutFilesRequest {
                name: name.into(),
                entries,
                ..Default::default()
            },
        )
    }

    /// kubelet's atomic-writer layout at timestamp `ts` with `key` = `value`.
    fn projected(ts: &str, key: &str, value: &str) -> Vec<FileEntry> {
        vec![
            entry("", FileKind::DIRECTORY, ""),
            entry(ts, FileKind::DIRECTORY, ""),
            entry(&format!("{ts}/{key}"), FileKind::REGULAR, value),
            entry("..data", FileKind::SYMLINK, ts),
            entry(key, FileKind::SYMLINK, &format!("..data/{key}")),
        ]
    }

    #[test]
    fn a_lone_file_is_rewritten_in_its_inode() {
        let d = tempfile::tempdir().unwrap();
        put(
            d.path(),
            "hosts",
            vec![entry("", FileKind::REGULAR, "127.0.0.1 a\n")],
        )
        .unwrap();
        let at = d.path().join("hosts");
        let ino = std::fs::metadata(&at).unwrap().ino();
        put(
            d.path(),
            "hosts",
            vec![entry("", FileKind::REGULAR, "10.0.0.1 b\n")],
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&at).unwrap(), "10.0.0.1 b\n");
        assert_eq!(
            std::fs::metadata(&at).unwrap().ino(),
            ino,
            "a bind mount holds the inode"
        );
    }

    #[test]
    fn a_projected_volume_follows_the_symlink_swap_and_loses_the_old_version() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "cm", projected("..2026_1", "k", "one")).unwrap();
        let cm = d.path().join("cm");
        assert_eq!(std::fs::read_to_string(cm.join("k")).unwrap(), "one");
        put(d.path(), "cm", projected("..2026_2", "k", "two")).unwrap();
        assert_eq!(std::fs::read_to_string(cm.join("k")).unwrap(), "two");
        assert!(!cm.join("..2026_1").exists(), "the old version is pruned");
        let mut names: Vec<_> = std::fs::read_dir(&cm)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["..2026_2", "..data", "k"],
            "no temporary names left"
        );
    }

    #[test]
    fn unchanged_files_keep_their_inode_and_mode_and_owner_follow_the_host() {
        let d = tempfile::tempdir().unwrap();
        let mut e = projected("..1", "k", "same");
        put(d.path(), "cm", e.clone()).unwrap();
        let f = d.path().join("cm/..1/k");
        let ino = std::fs::metadata(&f).unwrap().ino();
        put(d.path(), "cm", e.clone()).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().ino(), ino);
        e[2].mode = 0o440;
        e[2].gid = 1234;
        put(d.path(), "cm", e).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o440, 1234));
    }

    #[test]
    fn nothing_is_written_outside_the_copy() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["../x", "a/../../x", "/etc/x", "./x"] {
            let e = vec![
                entry("", FileKind::DIRECTORY, ""),
                entry(bad, FileKind::REGULAR, "x"),
            ];
            assert!(
                matches!(put(d.path(), "v", e), Err(Failure::Invalid(_))),
                "{bad}"
            );
        }
        // A file below a symlink of the tree would be written wherever the symlink points.
        let e = vec![
            entry("", FileKind::DIRECTORY, ""),
            entry("l", FileKind::SYMLINK, "/tmp"),
            entry("l/x", FileKind::REGULAR, "x"),
        ];
        assert!(matches!(put(d.path(), "v", e), Err(Failure::Invalid(_))));
        for bad in ["", "..", "a/b"] {
            let e = vec![entry("", FileKind::REGULAR, "x")];
            assert!(
                matches!(put(d.path(), bad, e), Err(Failure::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_copied_file_is_read_back_within_the_bound() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "log", vec![entry("", FileKind::REGULAR, "")]).unwrap();
        std::fs::write(d.path().join("log"), "exit reason: boom").unwrap();
        assert_eq!(read_in(d.path(), "log", 11).unwrap(), b"exit reason");
        assert!(matches!(
            read_in(d.path(), "../x", 10),
            Err(Failure::Invalid(_))
        ));
    }

    #[test]
    fn remove_takes_the_copy_away() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "cm", projected("..1", "k", "v")).unwrap();
        let req = PutFilesRequest {
            name: "cm".into(),
            remove: true,
            ..Default::default()
        };
        put_in(d.path(), &req).unwrap();
        assert!(!d.path().join("cm").exists());
        put_in(d.path(), &req).unwrap();
    }
}
