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
    /// A model does not fit the model cache's memory budget, even after evicting
    /// every idle model.
    #[error(
        "model `{model}` needs {needed_bytes} bytes but the model cache budget is \
         {budget_bytes} bytes, of which {in_use_bytes} are held by models in use"
    )]
    ModelTooLarge {
        /// The model's key in the cache.
        model: String,
        /// The bytes the model needs.
        needed_bytes: u64,
        /// The cache's budget.
        budget_bytes: u64,
        /// Bytes held by models that are in use and cannot be evicted.
        in_use_bytes: u64,
    },
    /// Another caller's load of the same model failed while this caller waited for it.
    #[error("loading model `{model}` failed: {reason}")]
    LoadFailed {
        /// The model's key in the cache.
        model: String,
        /// What the loading caller reported.
        reason: String,
    },
    /// Generation was cancelled by the caller.
    #[error("generation cancelled")]
    Cancelled,
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
