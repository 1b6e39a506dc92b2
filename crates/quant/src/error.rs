//! The crate's error type.

/// Everything that can go wrong in `afo-quant`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A kernel refused its inputs.
    #[error(transparent)]
    Kernel(#[from] crate::kernels::Error),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A weight has the wrong shape for a linear layer.
    #[error("weight `{name}`: {reason}")]
    Shape {
        /// The weight's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A scheme name is unknown.
    #[error(
        "unknown quantization scheme `{0}` (known: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
    )]
    UnknownScheme(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
