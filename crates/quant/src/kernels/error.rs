//! The error type of the quantized matrix kernels.

use super::{Kernel, WeightDType};

/// What went wrong in a kernel call or while reading GGML blocks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The inner dimension is not a whole number of 32-element blocks.
    #[error("inner dimension k = {k} is not a multiple of the block size {block}")]
    KNotMultipleOfBlock {
        /// The inner dimension that was given.
        k: usize,
        /// The block size of the format (32 for every supported format).
        block: usize,
    },
    /// A dimension is not a multiple of what a layout needs.
    #[error("{what}: {n} is not a multiple of {multiple}")]
    NotMultiple {
        /// The dimension, named.
        what: &'static str,
        /// Its value.
        n: usize,
        /// What it must be a multiple of.
        multiple: usize,
    },
    /// A buffer does not have the length the shape calls for.
    #[error("{what}: expected {expected} {unit}, got {actual}")]
    LengthMismatch {
        /// Which buffer (`"weight bytes"`, `"x"`, `"y"`, `"block"`, ...).
        what: &'static str,
        /// The length the shape calls for.
        expected: usize,
        /// The length that was given.
        actual: usize,
        /// The unit of both lengths (`"bytes"` or `"elements"`).
        unit: &'static str,
    },
    /// A matrix dimension is zero.
    #[error("{what} must be at least 1")]
    EmptyDimension {
        /// Which dimension (`"n_out"`, `"k"`).
        what: &'static str,
    },
    /// A candle tensor is not a 2-D `[n_out, k]` matrix.
    #[error("expected a 2-D [n_out, k] weight, got shape {dims:?}")]
    NotAMatrix {
        /// The dimensions of the tensor.
        dims: Vec<usize>,
    },
    /// A candle quantized tensor has a format these kernels do not handle.
    #[error("GGML type {dtype:?} is not supported by the kernels (Q4_0, Q4_1, Q8_0 are)")]
    UnsupportedDType {
        /// The GGML type of the tensor.
        dtype: candle_core::quantized::GgmlDType,
    },
    /// A string does not name a known weight format or kernel.
    #[error("unknown {what} `{name}`")]
    UnknownName {
        /// What was being parsed (`"weight format"`, `"kernel"`).
        what: &'static str,
        /// The string that was given.
        name: String,
    },
    /// A kernel was requested that this CPU cannot run.
    #[error("kernel {kernel} is not available on this CPU")]
    KernelUnavailable {
        /// The kernel that was requested.
        kernel: Kernel,
    },
    /// Weights repacked in panels of sixteen rows were given to a kernel that reads
    /// row-major blocks.
    #[error(
        "these {format} weights are repacked in 16-row panels, which kernel {kernel} does not read (AVX-512 VNNI reads every panel format's, AVX2 Q4_0's and Q4_1's); it needs row-major weights"
    )]
    PanelsUnreadable {
        /// The kernel that was requested.
        kernel: Kernel,
        /// The weights' format (`q4_0`, `int8`, ...).
        format: String,
    },
    /// Activations quantized for one inner dimension were used with weights of another.
    #[error("activations have k = {acts_k}, weights ({dtype}) have k = {weights_k}")]
    InnerDimensionMismatch {
        /// The inner dimension of the activations.
        acts_k: usize,
        /// The inner dimension of the weights.
        weights_k: usize,
        /// The format of the weights.
        dtype: WeightDType,
    },
    /// An int4 group size other than 32, 64 or 128.
    #[error("int4 group size {group} is not supported (32, 64 or 128 are)")]
    InvalidGroup {
        /// The group size that was given.
        group: usize,
    },
    /// The group size does not divide the row length.
    #[error("group size {group} does not divide the {k} columns of the matrix")]
    GroupDoesNotDivide {
        /// Columns (input features).
        k: usize,
        /// The group size.
        group: usize,
    },
    /// A weight, scale or minimum is NaN or infinite.
    #[error("non-finite value at row {row}, column {col}")]
    NonFinite {
        /// Row of the value.
        row: usize,
        /// Column of the value (for a scale: the first column of its group).
        col: usize,
    },
    /// Activations quantized for one inner dimension were used with integer weights of
    /// another.
    #[error("activations have k = {acts_k}, integer weights have k = {weights_k}")]
    IntInnerDimensionMismatch {
        /// The inner dimension of the activations.
        acts_k: usize,
        /// The inner dimension of the weights.
        weights_k: usize,
    },
    /// A size computation overflowed `usize`.
    #[error("{what}: size overflows usize")]
    Overflow {
        /// Which size.
        what: &'static str,
    },
    /// An error from candle while reading a quantized tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of the kernels module.
pub type Result<T> = std::result::Result<T, Error>;
