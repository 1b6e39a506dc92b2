//! The runtime's error type: each crate's error keeps its kind.

/// Everything that can go wrong in a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine failed (loading, tokenizing, generating).
    #[error(transparent)]
    Engine(#[from] afo_engine::Error),
    /// The memory guard failed (a probe could not be read).
    #[error(transparent)]
    Guard(#[from] afo_guard::Error),
    /// The SSOT log could not be written.
    #[error(transparent)]
    Ssot(#[from] afo_ssot::Error),
    /// The guard refused the run: it would pass the cutline.
    #[error("run refused by the memory guard: {0}")]
    Refused(afo_guard::Refusal),
    /// An image (or the model's preprocessor configuration) could not be used.
    #[error("image `{name}`: {source}")]
    Image {
        /// The image's name (or the configuration file's path).
        name: String,
        /// What went wrong.
        source: afo_image::Error,
    },
    /// A chain was asked to run on no image.
    #[error("the chain needs at least one image")]
    NoImages,
    /// Model selection failed (no model qualifies, no smaller variant fits).
    #[error(transparent)]
    Select(#[from] afo_select::Error),
    /// [`Runtime::query`](crate::Runtime::query) needs a catalog.
    #[error("no model catalog: give the runtime one with RuntimeBuilder::catalog")]
    NoCatalog,
    /// A catalog card names no file to load, or a scheme the runtime cannot load.
    #[error("model `{id}` cannot be loaded: {reason}")]
    CardNotLoadable {
        /// The card's id.
        id: String,
        /// Why not.
        reason: String,
    },
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
