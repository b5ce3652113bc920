//! Zeroing a template guest's free memory before the host saves it.
//!
//! Pages the kernel frees keep what they held: the initramfs archive and the tree unpacked
//! from it (emptied at the root switch), init code (poisoned with 0xcc when freed), the
//! firmware's copy of the kernel. QEMU saves every page that is not all zeroes, so in a
//! 320 MiB guest 110 MiB of that garbage went into the template and was copied into every
//! pod's memory on restore: load time and resident memory in each pod. Zero pages cost a
//! byte each in the state and nothing in a restored pod.
//!
//! The kernel has no call to zero its free lists, so the agent takes the free memory itself
//! through a memfd and writes zeroes into it (`fallocate` would not do: shmem leaves those
//! pages unwritten until read), then closes it, which gives the zeroed pages back.

use std::io::Write;

use anyhow::{Context, Result};

/// Left free throughout, so the kernel's own watermarks are never reached.
const MARGIN_KIB: u64 = 16 * 1024;
/// One write; also what a short `MemFree` reading can overshoot by.
const CHUNK: usize = 1 << 20;

/// A field of `/proc/meminfo` in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Writes zeroes over all free memory but [`MARGIN_KIB`]; returns the bytes zeroed.
pub fn zero_free_memory() -> Result<u64> {
    let free = meminfo_kib("MemFree").context("MemFree in /proc/meminfo")?;
    let want = free.saturating_sub(MARGIN_KIB) * 1024;
    let fd = rustix::fs::memfd_create("cocoon-zero", rustix::fs::MemfdFlags::CLOEXEC)
        .context("memfd_create")?;
    let mut file = std::fs::File::from(fd);
    let zeroes = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done + CHUNK as u64 <= want {
        if file.write_all(&zeroes).is_err() {
            break;
        }
        done += CHUNK as u64;
    }
    // Closing the memfd frees its pages, now all zero.
    drop(file);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_by_their_whole_name() {
        assert!(meminfo_kib("MemTotal").unwrap() > 0);
        assert!(meminfo_kib("MemFree").unwrap() > 0);
        assert_eq!(meminfo_kib("MemTot"), None);
    }
}
