//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
///
/// Each variant names the thing and the place (a file, a tensor, a metadata key).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
