//! A VM template's guest RAM, kept as a file of its own (issue #16).
//!
//! The template guest runs on a shared `memory-backend-file` in its directory and is saved
//! with QEMU's `x-ignore-shared`: the state then holds the devices alone (~400 KB), and the
//! RAM stays in the file. A pod's RAM must still be its own shared memory (the vhost-user
//! daemons map it), so each restore copies the file's data into a new memfd that QEMU maps as
//! `/proc/self/fd/<n>`.
//!
//! Why not QEMU's own loader, as before: it read a migration stream of all guest RAM a page at
//! a time and wrote each page through a fault that first zeroed it. `sendfile` here moves the
//! page-cache pages of the file's data extents straight into the memfd's new pages, which
//! the kernel does not zero first, and runs while QEMU starts. The template guest zeroed its
//! free memory before it was saved, and those pages are punched out of the file, so a restore
//! copies only pages with data (~80 of 256 MiB) and the rest reads as zeroes, taking no memory
//! until the guest touches it.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{FallocateFlags, MemfdFlags, SeekFrom};

use crate::error::{Error, Result};

const PAGE: usize = 4096;
const ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// How much of the RAM file is read at once while looking for zero pages.
const CHUNK: usize = 2 << 20;

fn fail(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Template(format!("{what} {}: {e}", path.display()))
}

/// Punches the all-zero pages out of `ram`, so that they take no disk and a restore skips
/// them; syncs it and returns the bytes that still hold data. On a filesystem that can't punch
/// holes the file stays whole: each restore then copies all of it, which is slower but right.
pub(crate) fn punch_zero_pages(ram: &Path) -> Result<u64> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ram)
        .map_err(|e| fail("open", ram, e))?;
    let len = f.metadata().map_err(|e| fail("stat", ram, e))?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut punched = 0u64;
    // Where the run of zero pages being read began.
    let mut run: Option<u64> = None;
    let mut off = 0u64;
    while off < len {
        let want = usize::try_from(len - off).map_or(CHUNK, |left| left.min(CHUNK));
        f.read_exact_at(&mut buf[..want], off)
            .map_err(|e| fail("read", ram, e))?;
        for (i, page) in buf[..want].chunks(PAGE).enumerate() {
            let at = off + (i * PAGE) as u64;
            match (page == &ZERO_PAGE[..page.len()], run) {
                (true, None) => run = Some(at),
                (false, Some(from)) => {
                    match punch(&f, ram, from, at)? {
                        Some(n) => punched += n,
                        None => return whole(&f, ram, len),
                    }
                    run = None;
                }
                _ => {}
            }
        }
        off += want as u64;
    }
    if let Some(from) = run {
        match punch(&f, ram, from, len)? {
            Some(n) => punched += n,
            None => return whole(&f, ram, len),
        }
    }
    f.sync_all().map_err(|e| fail("sync", ram, e))?;
    Ok(len - punched)
}

/// The bytes punched out, or None where the filesystem can't.
fn punch(f: &File, path: &Path, from: u64, to: u64) -> Result<Option<u64>> {
    match rustix::fs::fallocate(
        f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        from,
        to - from,
    ) {
        Ok(()) => Ok(Some(to - from)),
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(None),
        Err(e) => Err(fail("punch zero pages out of", path, e)),
    }
}

fn whole(f: &File, path: &Path, len: u64) -> Result<u64> {
    log::warn!(
        "{}: its filesystem can't punch holes, so every restore copies all of the template's RAM",
        path.display()
    );
    f.sync_all().map_err(|e| fail("sync", path, e))?;
    Ok(len)
}

/// A new, empty memfd of `size` bytes for a pod's guest RAM.
pub(crate) fn memfd(size: u64) -> Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("cocoon-guest-ram", MemfdFlags::CLOEXEC)
        .map_err(|e| Error::Template(format!("memfd for guest RAM: {e}")))?;
    rustix::fs::ftruncate(&fd, size)
        .map_err(|e| Error::Template(format!("size the guest RAM memfd: {e}")))?;
    Ok(fd)
}

/// Copies `ram`'s data extents into `into` at the same offsets; returns the bytes copied.
/// `ram` must be as long as `into`, the VM's memory.
pub(crate) fn fill(ram: &Path, into: &OwnedFd) -> Result<u64> {
    let src = File::open(ram).map_err(|e| fail("open", ram, e))?;
    let len = src.metadata().map_err(|e| fail("stat", ram, e))?.len();
    let size = rustix::fs::fstat(into)
        .map_err(|e| Error::Template(format!("stat the guest RAM memfd: {e}")))?
        .st_size;
    if i64::try_from(len).ok() != Some(size) {
        return Err(Error::Template(format!(
            "{} is {len} bytes; the VM's RAM is {size}",
            ram.display()
        )));
    }
    let mut copied = 0u64;
    let mut off = 0u64;
    while off < len {
        let data = match rustix::fs::seek(&src, SeekFrom::Data(off)) {
            Ok(d) => d,
            // No data after `off`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(fail("find data in", ram, e)),
        };
        let hole = rustix::fs::seek(&src, SeekFrom::Hole(data))
            .map_err(|e| fail("find a hole in", ram, e))?;
        rustix::fs::seek(into, SeekFrom::Start(data))
            .map_err(|e| Error::Template(format!("seek the guest RAM memfd: {e}")))?;
        let mut at = data;
        while at < hole {
            let want = usize::try_from(hole - at).unwrap_or(usize::MAX);
            let n = rustix::fs::sendfile(into, &src, Some(&mut at), want)
                .map_err(|e| fail("copy guest RAM from", ram, e))?;
            if n == 0 {
                return Err(fail("copy guest RAM from", ram, "it ended early"));
            }
            copied += n as u64;
        }
        off = hole;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Pages of `pattern`: 0 an all-zero page, anything else a page filled with it.
    fn file_of(pattern: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ram");
        let bytes: Vec<u8> = pattern.iter().flat_map(|b| [*b; PAGE]).collect();
        std::fs::write(&path, &bytes).unwrap();
        (d, path, bytes)
    }

    fn holes(path: &Path) -> Vec<(u64, u64)> {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len();
        let mut out = vec![];
        let mut off = 0;
        while off < len {
            let hole = rustix::fs::seek(&f, SeekFrom::Hole(off)).unwrap();
            if hole >= len {
                break;
            }
            let data = rustix::fs::seek(&f, SeekFrom::Data(hole)).unwrap_or(len);
            out.push((hole / PAGE as u64, data / PAGE as u64));
            off = data;
        }
        out
    }

    #[test]
    fn zero_pages_become_holes_and_the_contents_stay() {
        let (_d, path, bytes) = file_of(&[7, 0, 0, 9, 0, 1, 0]);
        assert_eq!(punch_zero_pages(&path).unwrap(), 3 * PAGE as u64);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(holes(&path), [(1, 3), (4, 5), (6, 7)]);
    }

    #[test]
    fn a_pod_gets_the_templates_ram_in_its_own_memfd() {
        let (_d, path, bytes) = file_of(&[0, 3, 0, 0, 5, 5, 0, 0]);
        punch_zero_pages(&path).unwrap();
        let fd = memfd(bytes.len() as u64).unwrap();
        assert_eq!(fill(&path, &fd).unwrap(), 3 * PAGE as u64);
        let mut got = vec![];
        let mut f = File::from(fd);
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, bytes);
        // The copy is the pod's: writing it leaves the template alone.
        f.write_all_at(&[1; PAGE], 0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_ram_file_of_another_size_is_refused() {
        let (_d, path, bytes) = file_of(&[1, 0]);
        let fd = memfd(bytes.len() as u64 * 2).unwrap();
        let e = fill(&path, &fd).unwrap_err().to_string();
        assert!(e.contains("the VM's RAM is"), "{e}");
    }
}
