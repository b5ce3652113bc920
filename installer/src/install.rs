//! `cocoon-deploy install`: the artifacts under the prefix, links on PATH, Cocoon's config,
//! containerd's drop-in and import. Every step first looks at what is there, so a second
//! install changes nothing that the first made; what it adds goes into the [`Record`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::containerd;
use crate::files::write_if_changed;
use crate::record::Record;
use crate::{
    io, Artifacts, Error, Node, Result, ARTIFACTS, CONFIG, CONTAINERD_CONFIG, CONTAINERD_ORIGINAL,
    DROPIN, LINKS, PREFIX,
};

/// What an install did, for its log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// Lines that say what changed; empty when the node already had this install.
    pub changes: Vec<String>,
    /// containerd's config changed: it must restart to load the handler.
    pub containerd_changed: bool,
}

/// Installs `from` on `node`.
pub fn install(node: &Node, from: &Artifacts) -> Result<Installed> {
    crate::node::check(node)?;
    for rel in ARTIFACTS {
        let p = from.dir.join(rel);
        if !p.is_file() {
            return Err(Error::Unsupported(format!(
                "the image lacks {} (built with `make deploy-image`?)",
                p.display()
            )));
        }
    }
    for (link, target) in LINKS {
        in_the_way(node, Path::new(link), Path::new(target))?;
    }
    let mut record = Record::load(node)?;
    if node.path(DROPIN).exists() && !record.files.iter().any(|f| f == Path::new(DROPIN)) {
        return Err(Error::InTheWay(format!(
            "{DROPIN} is there and no install of cocoon-deploy made it: Cocoon was installed \
             another way (`make install`?); remove that install first"
        )));
    }
    let mut done = Installed::default();

    // The prefix and the record's own place first, so that every later step is recorded.
    record.make_dir(node, Path::new("/opt/cocoon/state"))?;
    for rel in ARTIFACTS {
        let (src, abs) = (from.dir.join(rel), Path::new(PREFIX).join(rel));
        let data = std::fs::read(&src).map_err(io("read", &src))?;
        let mode = std::fs::metadata(&src)
            .map_err(io("stat", &src))?
            .permissions()
            .mode()
            & 0o777;
        if let Some(dir) = abs.parent() {
            record.make_dir(node, dir)?;
        }
        if write_if_changed(&node.path(&abs), &data, mode)? {
            done.changes.push(format!("wrote {}", abs.display()));
        }
    }
    record.version = std::fs::read_to_string(from.dir.join("VERSION"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    record.save(node)?;

    for (link, target) in LINKS {
        let link = Path::new(link);
        if let Some(dir) = link.parent() {
            record.make_dir(node, dir)?;
        }
        let here = node.path(link);
        if std::fs::read_link(&here).ok().as_deref() != Some(Path::new(target)) {
            std::os::unix::fs::symlink(target, &here).map_err(io("link", &here))?;
            done.changes
                .push(format!("linked {} → {target}", link.display()));
        }
        record.note_link(link);
    }

    // Cocoon's config: an operator's own is kept.
    let config = Path::new(CONFIG);
    if !node.path(config).exists() {
        record.make_dir(node, config.parent().unwrap_or(Path::new("/")))?;
        let data = read(&from.dir.join("etc/config.toml"))?;
        write_if_changed(&node.path(config), &data, 0o644)?;
        record.note_file(config);
        done.changes.push(format!("wrote {CONFIG}"));
    }

    let dropin = Path::new(DROPIN);
    record.make_dir(node, Path::new(containerd::DROPIN_DIR))?;
    let data = read(&from.dir.join("etc/containerd-cocoon.toml"))?;
    if write_if_changed(&node.path(dropin), &data, 0o644)? {
        done.changes.push(format!("wrote {DROPIN}"));
        done.containerd_changed = true;
    }
    record.note_file(dropin);
    record.save(node)?;

    if import(node, &mut record)? {
        done.changes.push(format!(
            "{CONTAINERD_CONFIG} imports {}",
            containerd::IMPORT_GLOB
        ));
        done.containerd_changed = true;
    }
    record.save(node)?;
    Ok(done)
}

/// Makes containerd's config import the drop-ins; true if it changed. The original file is
/// moved aside whole (its bytes, mode, owner and times) and a new one written in its place.
fn import(node: &Node, record: &mut Record) -> Result<bool> {
    let (config, original) = (node.path(CONTAINERD_CONFIG), node.path(CONTAINERD_ORIGINAL));
    match std::fs::read_to_string(&config) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            record.make_dir(node, Path::new("/etc/containerd"))?;
            write_if_changed(&config, containerd::fresh().as_bytes(), 0o644)?;
            if record.containerd_config_created.is_none() {
                record.containerd_config_created = Some(true);
            }
            Ok(true)
        }
        Err(e) => Err(io("read", &config)(e)),
        Ok(text) => {
            let Some(new) = containerd::with_import(&text) else {
                return Ok(false);
            };
            let mode = std::fs::metadata(&config)
                .map_err(io("stat", &config))?
                .permissions()
                .mode()
                & 0o7777;
            if record.containerd_config_created.is_none() {
                std::fs::rename(&config, &original).map_err(io("move aside", &config))?;
                record.containerd_config_created = Some(false);
                record.save(node)?;
            }
            write_if_changed(&config, new.as_bytes(), mode)?;
            Ok(true)
        }
    }
}

/// A file at `link` that is not Cocoon's link: another install (`make setup`'s) is there.
fn in_the_way(node: &Node, link: &Path, target: &Path) -> Result<()> {
    let here = node.path(link);
    match std::fs::symlink_metadata(&here) {
        Err(_) => Ok(()),
        Ok(m)
            if m.file_type().is_symlink()
                && std::fs::read_link(&here).ok().as_deref() == Some(target) =>
        {
            Ok(())
        }
        Ok(_) => Err(Error::InTheWay(format!(
            "{} is there and is not a link to {}: Cocoon was installed another way (`make \
             install`?); remove that install first",
            link.display(),
            target.display()
        ))),
    }
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(io("read", p))
}
