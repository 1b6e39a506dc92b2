//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the guard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A byte size could not be parsed.
    #[error("invalid byte size `{input}`: {reason} (examples: 20GiB, 20GB, 512MiB, 1073741824)")]
    ByteSize {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A budget setting is out of range.
    #[error("invalid memory budget: `{setting}` = {value}: {reason}")]
    Budget {
        /// The setting's name.
        setting: &'static str,
        /// The value given.
        value: String,
        /// The allowed range.
        reason: &'static str,
    },
    /// A probe file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operating system could not be queried.
    #[error("cannot query the system's memory: {0}")]
    System(String),
    /// A memory kind's name is not one of [`crate::MemoryKind::ALL`].
    #[error(
        "unknown memory kind `{0}` (runtime, weights, kv_cache, workspace, images, prefix_cache)"
    )]
    UnknownKind(String),
    /// A probe file did not hold what it should.
    #[error("`{path}`: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
