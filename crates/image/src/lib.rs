//! Image preprocessing for afo vision-language models.
//!
//! `afo-image` will own decoding with limits (bytes, dimensions, allocation), EXIF
//! orientation, the Qwen-VL `smart_resize` to a pixel budget, normalisation,
//! patchification to the layout the vision encoder expects, bounded parallel batching,
//! re-encoding for storage, and the image metrics recorded in the SSOT log.
//!
//! Status: planned. The crate exposes no items yet; each arrives when it works.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]
