//! The afo inference engine.
//!
//! `afo-engine` owns model formats (GGUF, safetensors directories, the Hugging Face
//! cache layout), tokenizers and chat templates, the decoder forward passes, sampling,
//! generation and streaming, and the lazy model cache.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

mod cache;
mod error;

pub use cache::{Acquired, CacheStats, CacheWeight, LoadedEntry, ModelCache};
pub use error::{Error, Result};
