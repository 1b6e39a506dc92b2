//! The crate's error type.

/// Everything that can go wrong in the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Appending would pass the cache's token capacity.
    #[error(
        "KV cache full: {len} + {adding} tokens would pass its capacity of {max_tokens} tokens"
    )]
    Full {
        /// Tokens held.
        len: usize,
        /// Tokens being added.
        adding: usize,
        /// The capacity.
        max_tokens: usize,
    },
    /// A layer index is out of range.
    #[error("layer {layer} is out of range (the cache has {layers} layers)")]
    Layer {
        /// The index.
        layer: usize,
        /// Layers in the cache.
        layers: usize,
    },
    /// Keys or values have an unexpected shape.
    #[error(
        "KV shape {got:?} does not fit the cache (expected [1, {kv_heads}, tokens, {head_dim}])"
    )]
    Shape {
        /// The shape given.
        got: Vec<usize>,
        /// KV heads.
        kv_heads: usize,
        /// Head dimension.
        head_dim: usize,
    },
    /// A prune policy string does not parse.
    #[error("prune policy `{text}` is not `none`, `window:N`, `sinks:S+N` or `h2o:BUDGET/RECENT`")]
    Policy {
        /// The text given.
        text: String,
    },
    /// The budget cannot hold a chunk: pruning cannot make room for it.
    #[error(
        "KV budget of {budget} tokens cannot take {adding} new tokens after keeping {kept} \
         (run the prompt in smaller chunks or raise the budget)"
    )]
    BudgetTooSmall {
        /// The budget.
        budget: usize,
        /// Tokens the policy keeps.
        kept: usize,
        /// Tokens being added.
        adding: usize,
    },
    /// A prefix cache's block size is zero.
    #[error("prefix cache block size of {block_tokens} tokens: it must be at least 1")]
    PrefixBlockTokens {
        /// The size given.
        block_tokens: usize,
    },
    /// More prompt tokens were given to publish than the KV cache holds.
    #[error("prefix cache insert: {tokens} tokens given, but the KV cache holds only {held}")]
    PrefixTokens {
        /// Tokens given.
        tokens: usize,
        /// Tokens the KV cache holds.
        held: usize,
    },
    /// A cached prefix block does not fit the KV cache it would seed.
    #[error(
        "prefix block {block} has shape {got:?} (layers, then keys), the KV cache wants {want:?}"
    )]
    PrefixLayout {
        /// The block's index in the hit.
        block: usize,
        /// The block's layers and key shape.
        got: Vec<usize>,
        /// The cache's.
        want: Vec<usize>,
    },
    /// A prefix can only seed an empty KV cache.
    #[error(
        "a prefix can only seed an empty KV cache; this one holds {len} tokens (position {position})"
    )]
    NotEmpty {
        /// Tokens held.
        len: usize,
        /// The cache's position.
        position: usize,
    },
    /// The cache's format cannot hold this model's keys and values.
    #[error("KV cache format {format} cannot be used: {reason}")]
    Format {
        /// The format.
        format: afo_guard::KvFormat,
        /// Why.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
