//! Byte-budgeted KV cache for afo.
//!
//! `afo-kvcache` will own the per-sequence key/value cache used by the decoder
//! forward passes: a capacity in bytes and tokens, block preallocation, pruning
//! policies (sliding window, attention sinks, heavy hitters) applied automatically when
//! the budget would be exceeded, a prefix cache shared across requests, and the cache
//! metrics recorded in the SSOT log.
//!
//! Status: planned. The crate exposes no items yet; each arrives when it works.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
