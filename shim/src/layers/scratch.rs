//! Scratch disks: the writable layer of a container whose rootfs the guest assembles
//! (`crate::pod::layer_rootfs`), when its writes go to disk rather than to guest memory.
//!
//! Each is a sparse file without a name (`O_TMPFILE`) in a root-only directory, formatted as
//! ext4 by `mkfs.ext4` on the host and handed to the VMM as a file descriptor. The host never
//! mounts or reads it: what the guest wrote is only ever parsed by the guest's kernel. Having
//! no name, it can't be left behind: its blocks go when the VMM closes it (the container's
//! disk taken out, or the VM gone, whatever ended it).
//!
//! ext4 without a journal: a scratch disk never outlives a crash, so there is nothing to
//! recover, and every write costs one trip to the host instead of two. Inode tables are left
//! lazy: the file reads as zeros where unwritten, and the guest mounts with `noinit_itable`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::Runner;
use crate::{Error, Result};

/// Makes scratch disks of one size in one directory.
#[derive(Clone)]
pub struct ScratchMaker {
    dir: PathBuf,
    size: u64,
    mkfs: PathBuf,
    run: Runner,
}

impl std::fmt::Debug for ScratchMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchMaker")
            .field("dir", &self.dir)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl ScratchMaker {
    /// Disks of `size` bytes in `dir` (made `0700` if missing), formatted by the `mkfs.ext4` at
    /// `mkfs`, run with `run`.
    pub fn new(dir: &Path, size: u64, mkfs: PathBuf, run: Runner) -> Result<ScratchMaker> {
        super::root_only_dir(dir)?;
        Ok(ScratchMaker {
            dir: dir.to_owned(),
            size,
            mkfs,
            run,
        })
    }

    /// A new formatted disk, open read-write. Blocking: call it off the async threads.
    pub fn make(&self) -> Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_TMPFILE)
            .open(&self.dir)
            .map_err(|e| {
                Error::io(
                    format!(
                        "make a scratch disk in {} (its filesystem must take O_TMPFILE files; \
                         or set rootfs.upper = \"memory\")",
                        self.dir.display()
                    ),
                    e,
                )
            })?;
        file.set_len(self.size)
            .map_err(|e| Error::io("size a scratch disk", e))?;
        // mkfs opens the file through this process's descriptor: it has no other name.
        let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        let mut cmd = std::process::Command::new(&self.mkfs);
        cmd.args(["-q", "-F", "-O", "^has_journal", "-m", "0", "-E"])
            .arg("lazy_itable_init=1,lazy_journal_init=1,nodiscard")
            .arg(&path);
        let (code, stderr) = (self.run)(cmd).map_err(|e| {
            Error::io(
                format!("run {} (install e2fsprogs)", self.mkfs.display()),
                std::io::Error::other(e),
            )
        })?;
        if code != 0 {
            return Err(Error::io(
                format!("{} {path}", self.mkfs.display()),
                std::io::Error::other(format!("exit status {code}: {}", stderr.trim())),
            ));
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_scratch_disk_is_a_sparse_ext4_file_without_a_name() {
        let Ok(mkfs) = which::which("mkfs.ext4") else {
            eprintln!("SKIPPED a_scratch_disk_is_a_sparse_ext4_file_without_a_name: no mkfs.ext4");
            return;
        };
        // On disk, as the default scratch_dir is: /tmp may be a filesystem without O_TMPFILE.
        let base = tempfile::tempdir_in("/var/tmp").unwrap();
        let dir = base.path().join("scratch");
        let maker = ScratchMaker::new(&dir, 1 << 30, mkfs, super::super::plain_runner()).unwrap();
        let mut disk = maker.make().unwrap();
        let meta = disk.metadata().unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(
            meta.blocks() * 512 < 16 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.nlink(), 0, "the disk has a name");
        // The ext4 superblock's magic, 1024 + 56 bytes in.
        let mut magic = [0u8; 2];
        disk.seek(std::io::SeekFrom::Start(1080)).unwrap();
        disk.read_exact(&mut magic).unwrap();
        assert_eq!(u16::from_le_bytes(magic), 0xEF53);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "the directory is root's only"
        );
    }
}
