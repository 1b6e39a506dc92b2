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
    /// The ledger refused the run: no plan tried fits under the cutline, even after
    /// idle models and prefix-cache blocks made room.
    #[error("run refused by the memory ledger: {refusal} (plans tried: {})", tried.join(", "))]
    Refused {
        /// The numbers, for the plan asked for.
        refusal: afo_guard::Refusal,
        /// The plans tried, in order.
        tried: Vec<String>,
    },
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
    /// An input of an embedding request cannot be embedded.
    #[error("input {index}: {reason}")]
    EmbedInput {
        /// The input's position in the request.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The inputs of an embedding request have more tokens in all than its limit.
    #[error("the inputs have at least {tokens} tokens in all, more than the limit of {limit}")]
    EmbedTooManyTokens {
        /// The tokens counted when the limit was passed.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// A catalog card names no file to load, or a scheme the runtime cannot load.
    #[error("model `{id}` cannot be loaded: {reason}")]
    CardNotLoadable {
        /// The card's id.
        id: String,
        /// Why not.
        reason: String,
    },
}

impl Error {
    /// The admission record of a run that ended with this error: a refusal by the
    /// ledger (of a run, or of a model's load) says what was tried; other errors
    /// have none.
    pub fn admission_record(&self) -> Option<afo_ssot::AdmissionRecord> {
        match self {
            Error::Refused { refusal, tried } => Some(crate::RunReport::refused(refusal, tried)),
            Error::Engine(afo_engine::Error::ModelTooLarge { refusal, .. }) => Some(
                crate::RunReport::refused(refusal, &["load the model".to_owned()]),
            ),
            _ => None,
        }
    }

    /// Whether the error is a refusal for memory (of a run or of a load).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::Refused { .. } | Error::Engine(afo_engine::Error::ModelTooLarge { .. })
        )
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
