//! Pieces of the guest image builder that are worth testing on their own: module dependency
//! resolution, the on-demand module set and the initramfs writer. `main.rs` drives them with Debian's tools.

pub mod initramfs;
pub mod modules;
pub mod on_demand;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("module `{0}` is not in modules.dep; is it built in, or misspelt? (check `modules.builtin`)")]
    UnknownModule(String),
    #[error("modules.dep line {line}: {message}")]
    BadModulesDep { line: usize, message: String },
    #[error("modules.dep has a dependency cycle through `{0}`")]
    Cycle(String),
    #[error("initramfs entry `{name}`: {message}")]
    BadEntry { name: String, message: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
