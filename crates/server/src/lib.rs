//! OpenAI-compatible HTTP server for afo.
//!
//! `afo-server` will own the HTTP API (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`), server-sent-event streaming, `/health`, Prometheus `/metrics` and the
//! live dashboard page, as a library other programs can mount and as `afo serve`.
//!
//! Status: planned. The crate exposes no items yet; each arrives when it works.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]
