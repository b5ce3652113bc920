//! The tree the guest sees over virtio-fs, and the host-only tree behind it.
//!
//! Layout (Kata's): `<run>/mounts/` is host-only; the caller mounts container rootfs (later
//! volumes) below it. `<run>/shared/` is a read-only bind of `mounts/`, and that is what
//! virtiofsd exports. The guest owns its kernel and can send virtiofsd any request, so the
//! host must never follow a path in the share that the guest could have changed: with the
//! bind read-only, the guest can't create, rename or remove names in the share's upper levels
//! (it can't move `<cid>/` away and plant a symlink where the host will later unmount). The
//! rootfs mounted below stay as writable as they were mounted.
//!
//! Propagation: `mounts/` is made a shared mount and `shared/` a slave of it, so what the
//! caller mounts under `mounts/` after the VM started shows up in `shared/` and in virtiofsd's
//! own mount namespace (its namespace sandbox turns every mount into a slave), while nothing
//! mounted on the export side flows back. The host's `/` is often private (as here), so this
//! can't be left to the defaults.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

/// The host-only directory, below `<run>`.
pub const HOST_DIR: &str = "mounts";
/// The exported directory, below `<run>`.
pub const EXPORT_DIR: &str = "shared";
/// Where a caller prepares a mount (outside the shared tree, so nothing propagates) before
/// binding it below the host dir: flags that only a remount can set (`nosuid`, `nodev` on a
/// bind) must be on the mount before it propagates, or the guest-side copies lack them.
pub const STAGING_DIR: &str = "staging";

/// Creates `<run>/mounts` and `<run>/shared` and binds them as described above. On failure
/// nothing stays mounted.
pub fn export(run_dir: &Path) -> Result<()> {
    let host = run_dir.join(HOST_DIR);
    let export = run_dir.join(EXPORT_DIR);
    for d in [&host, &export] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
    }
    let none: Option<&str> = None;
    let steps: [(Option<&Path>, &Path, MsFlags, &str); 5] = [
        (
            Some(&host),
            &host,
            MsFlags::MS_BIND,
            "bind the host dir onto itself",
        ),
        (None, &host, MsFlags::MS_SHARED, "make the host dir shared"),
        (
            Some(&host),
            &export,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            "bind it to the export",
        ),
        (None, &export, MsFlags::MS_SLAVE, "make the export a slave"),
        (
            None,
            &export,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            "make the export read-only",
        ),
    ];
    for (src, target, flags, what) in steps {
        if let Err(e) = mount(src, target, none, flags, none) {
            unexport(run_dir);
            return Err(Error::io(
                format!("{what} ({})", target.display()),
                std::io::Error::from(e),
            ));
        }
    }
    Ok(())
}

/// Detaches the export and the host dir (whatever is still mounted below them goes with them,
/// lazily) and removes both directories if they are empty. Safe to call on a run dir in any
/// state, including one never exported; never follows a symlink.
pub fn unexport(run_dir: &Path) {
    let staging = run_dir.join(STAGING_DIR);
    if let Ok(entries) = std::fs::read_dir(&staging) {
        for e in entries.flatten() {
            let _ = umount2(&e.path(), MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(&staging);
    for name in [EXPORT_DIR, HOST_DIR] {
        let d = run_dir.join(name);
        // Twice for the host dir: its self-bind can sit on top of nothing else, but a bind
        // made by an interrupted export may be stacked.
        for _ in 0..2 {
            if umount2(&d, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_err() {
                break;
            }
        }
        let _ = std::fs::remove_dir(&d);
    }
}

/// `<run>/mounts`.
pub fn host_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(HOST_DIR)
}

/// `<run>/shared`.
pub fn export_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(EXPORT_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn the_export_is_read_only_and_sees_later_mounts() {
        if !is_root() {
            eprintln!("SKIPPED the_export_is_read_only_and_sees_later_mounts: needs root to mount");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let run = t.path();
        export(run).unwrap();
        let host = host_dir(run);
        let exp = export_dir(run);
        std::fs::create_dir_all(host.join("c1/rootfs")).unwrap();
        // The guest's view: no new names, no renames at the top.
        let e = std::fs::create_dir(exp.join("evil")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
        let e = std::fs::rename(exp.join("c1"), exp.join("c1-moved")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
        // A rootfs mounted on the host side after the export appears there, writable.
        let none: Option<&str> = None;
        mount(
            Some("tmpfs"),
            &host.join("c1/rootfs"),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        std::fs::write(exp.join("c1/rootfs/file"), "x").unwrap();
        assert_eq!(std::fs::read(host.join("c1/rootfs/file")).unwrap(), b"x");
        umount2(&host.join("c1/rootfs"), MntFlags::UMOUNT_NOFOLLOW).unwrap();
        assert!(
            !exp.join("c1/rootfs/file").exists(),
            "the unmount propagates"
        );
        std::fs::remove_dir_all(host.join("c1")).unwrap();
        unexport(run);
        assert!(!host.exists() && !exp.exists());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&*run.to_string_lossy()), "{mounts}");
        unexport(run); // again: fine
    }

    fn libc_erofs() -> i32 {
        nix::errno::Errno::EROFS as i32
    }
}
