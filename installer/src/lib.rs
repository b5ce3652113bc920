//! Installs Cocoon on a node from the deploy image's artifacts, and takes it off again
//! (issue #32), as kata-deploy does for Kata: everything under one prefix (`/opt/cocoon`),
//! links where containerd looks for shims, Cocoon's config, containerd's drop-in and the
//! `imports` line in containerd's config. What install adds is written down as it goes
//! ([`Record`]), and uninstall takes away exactly that and gives containerd's config back as
//! it was (the original file itself, moved aside and back). Both run on a node root seen at
//! any path (`--host-root`, `/host` in the DaemonSet), so the tests run them on a scratch
//! tree.

pub mod containerd;
mod files;
mod install;
pub mod label;
pub mod node;
mod record;
mod uninstall;

use std::path::{Path, PathBuf};

pub use install::{install, Installed};
pub use record::Record;
pub use uninstall::{uninstall, Uninstalled};

/// Where everything goes on the node.
pub const PREFIX: &str = "/opt/cocoon";
/// The install record, under the prefix.
pub const RECORD: &str = "/opt/cocoon/state/install.json";
/// containerd's config moved aside at install, given back at uninstall.
pub const CONTAINERD_ORIGINAL: &str = "/opt/cocoon/state/containerd-config.toml.orig";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The node is not one Cocoon can be installed on, and why.
    #[error("this node can't run Cocoon: {0}")]
    Unsupported(String),
    /// Something of another install is in the way.
    #[error("{0}")]
    InTheWay(String),
    #[error("the install record {}: {message}", path.display())]
    Record { path: PathBuf, message: String },
    #[error("{0}")]
    Node(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A node's root filesystem, as this process sees it.
#[derive(Debug, Clone)]
pub struct Node {
    root: PathBuf,
}

impl Node {
    pub fn new(root: impl Into<PathBuf>) -> Node {
        Node { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The node's absolute path `abs`, here.
    pub fn path(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        self.root.join(abs.strip_prefix("/").unwrap_or(abs))
    }
}

/// The image's artifacts: `<dir>/<path under the prefix>`, copied to `PREFIX/<path>`.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
}

/// What the image carries, by path under the prefix. The config and the drop-in are
/// templates for the node's `/etc` files.
pub const ARTIFACTS: [&str; 11] = [
    "bin/containerd-shim-cocoon-v2",
    "bin/cocoon",
    "bin/cocoon-deploy",
    "libexec/virtiofsd",
    "libexec/vhost-device-vsock",
    "share/vmlinuz",
    "share/initramfs.img",
    "share/manifest.json",
    "etc/config.toml",
    "etc/containerd-cocoon.toml",
    "VERSION",
];

/// Links on the node's PATH into the prefix: containerd finds a shim by its name on PATH.
pub const LINKS: [(&str, &str); 2] = [
    (
        "/usr/local/bin/containerd-shim-cocoon-v2",
        "/opt/cocoon/bin/containerd-shim-cocoon-v2",
    ),
    ("/usr/local/bin/cocoon", "/opt/cocoon/bin/cocoon"),
];

/// Cocoon's config on the node, from `etc/config.toml`, unless one is there.
pub const CONFIG: &str = "/etc/cocoon/config.toml";
/// The drop-in that registers the CRI handler `cocoon`.
pub const DROPIN: &str = "/etc/containerd/conf.d/cocoon.toml";
/// containerd's config.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

#[cfg(test)]
mod tests;
