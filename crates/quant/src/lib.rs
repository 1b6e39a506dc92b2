//! Weight quantization for afo.
//!
//! `afo-quant` will own the weight quantization schemes (int8 per-channel weight-only,
//! int4 grouped, the GGML block formats used by GGUF files), the quantized linear layer
//! (`QLinear`) that every decoder layer calls, its fast CPU kernels with run-time CPU
//! feature detection, on-load quantization, and per-tensor byte accounting used by the
//! memory guard's estimator.
//!
//! Status: planned. The crate exposes no items yet; each arrives when it works.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

pub mod kernels;
