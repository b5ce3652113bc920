//! One layer directory into one EROFS image, with Debian 12's `mkfs.erofs` (erofs-utils 1.5),
//! and the checks that tell a whole image from a damaged one.
//!
//! The defaults of mkfs.erofs keep what a container's root needs from a layer: ownership,
//! modes (setuid too), per-file mtimes, hard links, devices (overlayfs whiteouts are `c 0:0`)
//! and every xattr it knows, `trusted.overlay.opaque` and `security.capability` included (it
//! must run as root: only CAP_SYS_ADMIN lists `trusted.*`). Not compressed: the guest's
//! kernel could read lz4, but every guest would pay the decompression, and the host's page
//! cache, which every pod of the image shares, would hold the compressed blocks only.
//! `SOURCE_DATE_EPOCH` is removed from its environment, or it clamps the mtimes.
//!
//! erofs-utils 1.5 leaves out, without a word, every name that starts with `lost+found`
//! (fixed in 1.6): a layer holding one is refused here ([`Unsupported`]), and its container
//! keeps the shared filesystem.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where the superblock starts, and its magic (`EROFS_SUPER_MAGIC_V1`).
const SUPER_OFFSET: usize = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
/// `feature_compat` bit: the superblock carries a crc32c of itself.
const COMPAT_SB_CHKSUM: u32 = 0x1;

/// A layer that erofs-utils 1.5 can't turn into a faithful image; the reason names the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

/// Builds the image of `layer` at `out` (created or replaced). Refuses a layer with a name
/// that erofs-utils 1.5 would drop.
pub fn build(
    mkfs: &Path,
    layer: &Path,
    out: &Path,
    run: &super::Runner,
) -> Result<std::result::Result<(), Unsupported>> {
    if let Some(name) = dropped_name(layer)? {
        return Ok(Err(Unsupported(format!(
            "{} holds {}, which erofs-utils 1.5 would leave out of the image",
            layer.display(),
            name.display()
        ))));
    }
    let mut cmd = std::process::Command::new(mkfs);
    cmd.env_remove("SOURCE_DATE_EPOCH")
        .arg("--quiet")
        .arg(out)
        .arg(layer);
    let (code, stderr) = run(cmd).map_err(|e| {
        Error::io(
            format!("run {} (install erofs-utils)", mkfs.display()),
            std::io::Error::other(e),
        )
    })?;
    if code == 0 {
        return Ok(Ok(()));
    }
    Err(Error::io(
        format!("{} {} {}", mkfs.display(), out.display(), layer.display()),
        std::io::Error::other(format!("exit status {code}: {}", stderr.trim())),
    ))
}

/// The first name below `dir` (not following symlinks) that starts with `lost+found`.
fn dropped_name(dir: &Path) -> Result<Option<PathBuf>> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| Error::io(format!("read {}", d.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(format!("read {}", d.display()), e))?;
            if e.file_name().as_encoded_bytes().starts_with(b"lost+found") {
                return Ok(Some(e.path()));
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    Ok(None)
}

/// What a sound image says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks: u64,
}

/// Reads and checks the superblock of the image at `path`: the magic, the superblock's own
/// crc32c where it has one, and a file exactly as long as its blocks (mkfs sizes it so): a
/// truncated or overwritten image fails here.
pub fn check_superblock(path: &Path) -> std::result::Result<Superblock, String> {
    let mut head = vec![0u8; 4096];
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f.read_exact(&mut head)
        .map_err(|e| format!("shorter than a superblock: {e}"))?;
    let le32 = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if le32(SUPER_OFFSET) != MAGIC {
        return Err("no erofs magic".into());
    }
    let bits = head[SUPER_OFFSET + 12];
    if !(9..=16).contains(&bits) {
        return Err(format!("block size 2^{bits}"));
    }
    let block_size = 1u64 << bits;
    if le32(SUPER_OFFSET + 8) & COMPAT_SB_CHKSUM != 0 {
        let end = usize::try_from(block_size).unwrap_or(4096).min(head.len());
        let mut sb = head[SUPER_OFFSET..end].to_vec();
        sb[4..8].fill(0);
        // The kernel's crc32c(~0, …): the standard CRC-32C without its final inversion.
        let raw = !crc32c::crc32c(&sb);
        if raw != le32(SUPER_OFFSET + 4) {
            return Err("superblock checksum mismatch".into());
        }
    }
    let blocks = u64::from(le32(SUPER_OFFSET + 36));
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len != blocks * block_size {
        return Err(format!(
            "{len} bytes where the superblock counts {blocks} blocks of {block_size}"
        ));
    }
    Ok(Superblock { block_size, blocks })
}

/// The crc32c of the whole file at `path` (with the CPU's instruction: a 100 MiB image in
/// tens of milliseconds, from the page cache).
pub fn file_crc(path: &Path) -> std::io::Result<u32> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}
