//! What an install added to the node, written as it goes, read by the next install (which
//! adds to it) and by uninstall (which takes exactly that away).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{io, Error, Node, Result, RECORD};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Directories install made, outermost first (removed innermost first, when empty).
    pub dirs: Vec<PathBuf>,
    /// Files install wrote outside the prefix (the prefix goes whole).
    pub files: Vec<PathBuf>,
    /// Links install made.
    pub links: Vec<PathBuf>,
    /// containerd's config: `Some(true)` if install made it (none was there), `Some(false)` if
    /// it moved the original aside (`CONTAINERD_ORIGINAL`), None if it left it alone.
    pub containerd_config_created: Option<bool>,
    /// The image version installed last.
    pub version: String,
}

impl Record {
    /// The node's record; an empty one where there is none.
    pub fn load(node: &Node) -> Result<Record> {
        let path = node.path(RECORD);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Record {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    /// Whether the node has an install.
    pub fn exists(node: &Node) -> bool {
        node.path(RECORD).exists()
    }

    pub fn save(&self, node: &Node) -> Result<()> {
        let path = node.path(RECORD);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Record {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::files::write_if_changed(&path, text.as_bytes(), 0o600).map(|_| ())
    }

    /// Makes `dir` (a node path) with its missing parents, noting each one made.
    pub fn make_dir(&mut self, node: &Node, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(dir);
        while let Some(d) = cur {
            if node.path(d).exists() {
                break;
            }
            missing.push(d.to_owned());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            let here = node.path(&d);
            std::fs::create_dir(&here).map_err(io("create", &here))?;
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
        Ok(())
    }

    pub fn note_file(&mut self, abs: &Path) {
        if !self.files.iter().any(|f| f == abs) {
            self.files.push(abs.to_owned());
        }
    }

    pub fn note_link(&mut self, abs: &Path) {
        if !self.links.iter().any(|f| f == abs) {
            self.links.push(abs.to_owned());
        }
    }
}
