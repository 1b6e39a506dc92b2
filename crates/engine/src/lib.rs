//! The afo inference engine.
//!
//! `afo-engine` will own model formats (GGUF, safetensors directories, the Hugging Face
//! cache layout), tokenizers and chat templates, the decoder forward passes, sampling,
//! generation and streaming, the batching scheduler, the lazy model cache and the
//! vision-language path.
//!
//! Status: planned. The crate exposes no items yet; each arrives when it works.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
