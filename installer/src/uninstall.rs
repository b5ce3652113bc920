//! `cocoon-deploy uninstall`: takes away what the [`Record`] says install added, gives
//! containerd's config back (the original file, moved back), and nothing else. A node without
//! a record has nothing to take away.

use std::path::Path;

use crate::record::Record;
use crate::{io, Node, Result, CONFIG, CONTAINERD_CONFIG, CONTAINERD_ORIGINAL, PREFIX};

/// What an uninstall did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    pub changes: Vec<String>,
    pub containerd_changed: bool,
    /// Files left because they changed since install (an operator's edits).
    pub kept: Vec<String>,
}

pub fn uninstall(node: &Node) -> Result<Uninstalled> {
    let mut done = Uninstalled::default();
    if !Record::exists(node) {
        return Ok(done);
    }
    let record = Record::load(node)?;
    for link in &record.links {
        let here = node.path(link);
        if std::fs::read_link(&here)
            .ok()
            .is_some_and(|t| t.starts_with(PREFIX))
        {
            std::fs::remove_file(&here).map_err(io("remove", &here))?;
            done.changes.push(format!("removed {}", link.display()));
        }
    }
    let config_template = std::fs::read(node.path(Path::new(PREFIX).join("etc/config.toml")));
    for file in &record.files {
        let here = node.path(file);
        if file == Path::new(CONFIG) {
            // The operator's edits are theirs to keep.
            let ours = config_template.as_ref().ok();
            if std::fs::read(&here).ok().as_ref() != ours && here.exists() {
                done.kept
                    .push(format!("{} (changed since install)", file.display()));
                continue;
            }
        }
        match std::fs::remove_file(&here) {
            Ok(()) => done.changes.push(format!("removed {}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &here)(e)),
        }
        done.containerd_changed |= file.starts_with("/etc/containerd");
    }
    let (config, original) = (node.path(CONTAINERD_CONFIG), node.path(CONTAINERD_ORIGINAL));
    match record.containerd_config_created {
        Some(false) => {
            std::fs::rename(&original, &config).map_err(io("restore", &config))?;
            done.changes.push(format!("restored {CONTAINERD_CONFIG}"));
            done.containerd_changed = true;
        }
        Some(true) => {
            let _ = std::fs::remove_file(&config);
            done.changes.push(format!("removed {CONTAINERD_CONFIG}"));
            done.containerd_changed = true;
        }
        None => {}
    }
    let prefix = node.path(PREFIX);
    std::fs::remove_dir_all(&prefix).map_err(io("remove", &prefix))?;
    done.changes.push(format!("removed {PREFIX}"));
    // Directories install made, innermost first, where nothing else came to live in them.
    for dir in record.dirs.iter().rev() {
        let _ = std::fs::remove_dir(node.path(dir));
    }
    Ok(done)
}
