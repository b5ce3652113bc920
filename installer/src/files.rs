//! Writing a node's files: whole or not at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{io, Result};

/// Writes `data` to `path` with `mode` unless it already holds exactly that; true if it
/// wrote. Through a temporary file and a rename, so a node never sees half a file (a shim
/// binary containerd is starting, a config it is reading).
pub fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> Result<bool> {
    let same = std::fs::read(path).is_ok_and(|d| d == data)
        && std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if same {
        return Ok(false);
    }
    let tmp: PathBuf = path.with_extension("cocoon-deploy-tmp");
    std::fs::write(&tmp, data).map_err(io("write", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("install", path))?;
    Ok(true)
}
