//! Byte-budgeted KV cache for afo, with pruning policies and a prefix cache.
//!
//! [`KvCache`] is the per-sequence key/value cache of a decoder: one pair of buffers
//! per layer, shaped `[1, kv_heads, capacity, head_dim]`, preallocated in blocks of
//! [`KvCacheConfig::block_tokens`] and grown geometrically, so appending a token writes
//! only that token (no copy of the whole cache per step). [`KvCache::append`] returns
//! views of the keys and values so far; [`KvCache::truncate`] drops the tail (prefix
//! reuse); [`KvCache::bytes`] is the memory held. A cache refuses to grow past its
//! token capacity with a clear error rather than silently dropping context.
//!
//! A cache with a [`KvCacheConfig::budget_tokens`] prunes itself by its
//! [`PrunePolicy`] before an append would pass the budget: [`PrunePolicy::SlidingWindow`]
//! keeps the most recent tokens, [`PrunePolicy::Sinks`] also the first few (StreamingLLM's
//! attention sinks), [`PrunePolicy::HeavyHitters`] the tokens that received the most
//! attention so far plus a recent window (H2O; the forward pass reports the attention
//! weights through [`KvCache::observe`]). Pruning frees [`KvCacheConfig::block_tokens`]
//! slots at a time (at most a quarter of the budget) so that decoding does not compact
//! the cache at every step.
//!
//! # Formats
//!
//! [`KvCacheConfig::format`] says how keys and values are held ([`KvFormat`]): f32,
//! f16 (the default), bf16, or GGML's Q8_0 blocks (per 32 elements one `f16` scale
//! and 32 `i8` quants, 8.5 bits per element: 26.6% of f32). [`KvCache::append`] takes
//! keys and values in any float type and encodes them
//! ([`KvCacheConfig::encode`]); it returns the held rows as the buffers store them
//! (`[1, kv_heads, len, width]`, [`KvCacheConfig::storage`]), which the engine's fused
//! attention reads in place and [`KvCacheConfig::decode`] turns into f32. Every
//! byte figure ([`KvCacheConfig::bytes_per_token`], [`KvCache::bytes`]) is the
//! format's, through the guard's one formula ([`afo_guard::kv_bytes_per_token`]).
//!
//! # Positions after pruning
//!
//! Keys are cached after RoPE, rotated for the position they were computed at, and they
//! keep it: a pruned cache is a set of past tokens at their original positions. New
//! tokens take position [`KvCache::position`] (tokens seen, not tokens held), so the
//! relative distance between a new query and every kept key stays true. The
//! alternative (StreamingLLM's re-positioning inside the cache) would need the keys
//! before RoPE and a re-rotation at every prune; keeping true positions costs nothing
//! and is what H2O does. Past the model's trained context the positions themselves
//! run out, so pruning extends how long a sequence can run at a fixed memory, not the
//! positions a model can handle.
//!
//! # Prefix cache
//!
//! [`PrefixCache`] keeps the keys and values of prompt prefixes across requests, in
//! blocks of [`PrefixCacheConfig::block_tokens`] tokens keyed by chained hashes of
//! their tokens and a caller's [`Salt`] (the model, the images of the prompt). A
//! [`PrefixCache::lookup`] finds the longest cached block-aligned prefix of a prompt
//! as a [`PrefixHit`], which holds its blocks by reference count and seeds a fresh
//! [`KvCache`] with them ([`PrefixHit::seed`]); after the rest of the prompt has run,
//! [`PrefixCache::insert`] publishes the new full blocks. Blocks are read-only and
//! shared; a sequence writes only its own copy. Unreferenced blocks are evicted least
//! recently used under a byte budget and dropped after a time-to-live; a pruned cache
//! publishes nothing, since its positions are no longer `0..len`. See [`prefix`] for
//! the details.
//!
//! # Example
//!
//! ```
//! use afo_kvcache::{KvCache, KvCacheConfig, KvFormat};
//! use candle_core::{DType, Device, Tensor};
//!
//! # fn main() -> Result<(), afo_kvcache::Error> {
//! let config = KvCacheConfig { layers: 2, kv_heads: 3, head_dim: 64, max_tokens: 1024,
//!                              block_tokens: 32, format: KvFormat::F32,
//!                              budget_tokens: None, policy: Default::default() };
//! let mut cache = KvCache::new(config, &Device::Cpu);
//! let k = Tensor::zeros((1, 3, 5, 64), DType::F32, &Device::Cpu)?;
//! let (keys, values) = cache.append(0, &k, &k)?;
//! assert_eq!(keys.dims(), [1, 3, 5, 64]);
//! cache.append(1, &k, &k)?;
//! cache.commit(5)?;
//! assert_eq!(cache.len(), 5);
//! # Ok(())
//! # }
//! ```
//!
//! Reusing a prefix:
//!
//! ```
//! use afo_kvcache::{KvCache, KvCacheConfig, KvFormat, PrefixCache, PrefixCacheConfig, Salt};
//! use candle_core::{DType, Device, Tensor};
//!
//! # fn main() -> Result<(), afo_kvcache::Error> {
//! let config = KvCacheConfig { layers: 1, kv_heads: 1, head_dim: 8, max_tokens: 256,
//!                              block_tokens: 32, format: KvFormat::F32,
//!                              budget_tokens: None, policy: Default::default() };
//! let prefixes = PrefixCache::new(PrefixCacheConfig::default())?; // blocks of 16 tokens
//! let salt = Salt::new(b"my-model");
//! let prompt: Vec<u32> = (0..40).collect();
//!
//! // The first request runs its whole prompt, then publishes its two full blocks.
//! let mut first = KvCache::new(config, &Device::Cpu);
//! let kv = Tensor::ones((1, 1, 40, 8), DType::F32, &Device::Cpu)?;
//! first.append(0, &kv, &kv)?;
//! first.commit(40)?;
//! assert_eq!(prefixes.insert(salt, &prompt, &first)?, 2);
//!
//! // The next one starts from the first 32 tokens and runs only the rest.
//! let hit = prefixes.lookup(salt, &prompt);
//! let mut second = KvCache::new(config, &Device::Cpu);
//! hit.seed(&mut second)?;
//! assert_eq!((hit.tokens(), second.len()), (32, 32));
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! None.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod cache;
mod error;
mod policy;
pub mod prefix;

pub use afo_guard::KvFormat;
pub use cache::{KvCache, KvCacheConfig};
pub use error::{Error, Result};
pub use policy::PrunePolicy;
pub use prefix::{PrefixCache, PrefixCacheConfig, PrefixCacheStats, PrefixHit, Salt};
