//! The afo runtime facade.
//!
//! `afo-runtime` is the one crate other Rust programs embed. It re-exports the leaf
//! crates under short names and will own the `Runtime` and its builder, which wire the
//! memory guard, model selection, the engine and the SSOT log together.
//!
//! Today it re-exports:
//!
//! - [`ssot`]: the monitoring schema, its JSONL writer and reader, and log summaries;
//! - [`guard`]: the memory budget, probes, peak estimator, badge and admission.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

pub use afo_guard as guard;
pub use afo_ssot as ssot;
