//! OpenAI-compatible HTTP server for afo, with `/health`, Prometheus `/metrics` and
//! a live dashboard.
//!
//! [`Server`] wraps an [`afo_runtime::Runtime`]; [`Server::router`] (or the free
//! function [`router`]) is an [`axum::Router`] other programs mount, and
//! [`Server::serve`] runs it with a graceful shutdown. `afo serve` is this crate
//! behind a command line.
//!
//! # Endpoints
//!
//! - `POST /v1/chat/completions`: messages whose content is a string or a list of
//!   parts (`text`, and `image_url` with a `data:` URL for vision models; a text-only
//!   model answers 400 to images). `stream: true` answers with server-sent events as
//!   OpenAI does: `data: {chat.completion.chunk}` lines, the first carrying the role,
//!   the last the `finish_reason`, a usage chunk when `stream_options.include_usage`
//!   is set, then `data: [DONE]`. Without streaming the response carries `usage`.
//! - `POST /v1/completions`: a plain-text prompt, the same way.
//! - `POST /v1/embeddings`: pooled, normalised final hidden states of a text model
//!   (`input` as a string, strings, token ids or token-id lists; `encoding_format`
//!   `float` or `base64`; `dimensions`; the extension `pooling`, `last` or `mean`),
//!   through the runtime's one admission, one SSOT record per request.
//! - `GET /v1/models`: the models served, and `auto`, which routes each request
//!   through the runtime's model selector ([`afo_runtime::Runtime::route`]; the first
//!   model served when the runtime has no catalog).
//! - `GET /health`: the badge, the health score, memory used against the cutline,
//!   the models and whether they are loaded.
//! - `GET /metrics`: Prometheus text, named after the OpenTelemetry GenAI
//!   conventions (`gen_ai_server_request_duration_seconds`,
//!   `gen_ai_server_time_to_first_token_seconds`,
//!   `gen_ai_server_time_per_output_token_seconds`, `gen_ai_client_token_usage`) plus
//!   `afo_*` gauges of memory, cache hit rate and scheduler queues.
//! - `GET /api/runs`: the last SSOT records written; `GET /api/history`: health
//!   samples (one a second for the last ten minutes by default: resident and
//!   reserved memory, cutline, warn line, badge, each model's waiting and running
//!   requests); `GET /`: the dashboard page, which charts them.
//!
//! # Concurrency and admission
//!
//! Each model has one worker thread that owns its batching
//! [`Scheduler`](afo_runtime::engine::Scheduler): requests join the running batch
//! between decode steps, each with its own sampling. The server keeps no memory
//! accounting of its own: a request is refused before it is queued when the model's
//! queue is full (429 `queue_full`) or when it could never fit under the cutline
//! (503 `memory_unavailable`, by [`Runtime::check_admissible`](afo_runtime::Runtime::check_admissible)),
//! always with `Retry-After`; the worker starts a request once the runtime's ledger
//! admits it ([`Runtime::batch_admission`](afo_runtime::Runtime::batch_admission)). A
//! worker lets go of its model when idle, so that a load that needs the bytes can
//! evict it. A client that disconnects cancels its request. Every request writes one
//! SSOT v2 record through [`Runtime::record`](afo_runtime::Runtime::record), refused
//! ones included.
//!
//! Errors are OpenAI-style bodies, `{"error": {"message", "type", "param", "code"}}`,
//! never a panic: see [`ApiError`].
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use afo_runtime::Runtime;
//! use afo_server::Server;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Arc::new(Runtime::builder().ssot_log("logs/runs.jsonl").build()?);
//! let server = Server::builder(runtime)
//!     .model("models/SmolLM2-135M-Instruct.Q4_1.gguf")
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! server
//!     .serve(listener, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
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

mod anthropic;
mod compat;
mod conn;
mod embeddings;
mod error;
mod history;
mod logprobs;
mod metrics;
pub mod openai;
mod responses;
mod routes;
mod server;
mod state;
mod tools;
mod vision;
mod worker;

pub use error::{ApiError, Error, Result};
pub use server::{Server, ServerBuilder};

/// The routes of `server`, to mount in another program's [`axum::Router`]; the
/// same as [`Server::router`].
pub fn router(server: &Server) -> axum::Router {
    server.router()
}
