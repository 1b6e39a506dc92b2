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
        "unknown quantization scheme `{0}` (known: f32, f16, bf16, int8, int4[-g32|-g64|-g128][-asym], q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, q8_k)"
    )]
    UnknownScheme(String),
    /// A tensor cannot be stored in a scheme (its row length does not fit the blocks or
    /// groups, or it has NaN or infinite values).
    #[error("tensor `{name}` cannot be quantized to {scheme}: {reason}")]
    CannotQuantize {
        /// The tensor's name.
        name: String,
        /// The scheme asked for.
        scheme: crate::QuantScheme,
        /// Why not.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
