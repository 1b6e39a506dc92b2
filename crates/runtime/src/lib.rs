//! The afo runtime facade: one builder, one call, one SSOT record per run.
//!
//! `afo-runtime` is the crate other Rust programs embed. [`Runtime`] wires the memory
//! guard, the lazy model cache, the engine and the SSOT log together:
//!
//! 1. the model is acquired from the cache (loaded on first use, shared after); its
//!    bytes are reserved in the runtime's one [`guard::Ledger`] before the load, idle
//!    models making room least recently used first;
//! 2. the run's memory is estimated ([`Runtime::estimate_text`]) and admitted on the
//!    ledger ([`Runtime::admit`]): the plan asked for, else a cheaper one (a KV budget
//!    with attention sinks, a smaller `max_tokens`), else a refusal with the numbers
//!    ([`Error::Refused`]);
//! 3. the engine generates, streaming text deltas to the caller;
//! 4. the real peak is measured (sampled RSS; the ledger says what each run holds),
//!    turned into a badge and a health score, and one v2 record is appended to the
//!    SSOT log ([`Runtime::record`]) — for refused and failed runs too.
//!
//! [`Runtime::embed`] turns texts or token ids into pooled, normalised vectors from a
//! decoder's final hidden states, admitted and recorded the same way.
//!
//! What the server's agent API offers is here without it: a
//! [`Constraint`](engine::Constraint) (JSON schema, Lark grammar, regex) and a
//! [`ReasoningBudget`](engine::ReasoningBudget) in [`GenerateRequest::options`], tools
//! and thinking with [`GenerateRequest::with_tools`] and
//! [`GenerateRequest::with_thinking`], and a chat's output read back as reasoning,
//! answer and tool calls in [`GenerateResponse::output`].
//!
//! [`Runtime::chain`] runs the image-analysis -> summary chain: [`image`] preprocesses
//! the images, a vision-language model ([`engine::VisionLanguageModel`]) describes
//! them, and a text model (or the VLM's own language model, on the same loaded
//! instance) summarises, with one record carrying each stage's time, the image pixels,
//! the compression ratio and the predicted and measured peak.
//!
//! With no catalog file, [`find_models`] lists the models in a folder and the Hugging
//! Face cache, and [`catalog_of`] turns them into a [`select::Catalog`], each card read
//! from its model file ([`card_from_model`]).
//!
//! The leaf crates are re-exported under short names: [`ssot`], [`guard`], [`quant`],
//! [`kvcache`], [`image`] and [`engine`].
//!
//! # Example
//!
//! ```no_run
//! use afo_runtime::{GenerateRequest, Prompt, Runtime};
//! use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
//!
//! # fn main() -> Result<(), afo_runtime::Error> {
//! let runtime = Runtime::builder()
//!     .cutline("8GiB".parse()?)
//!     .ssot_log("logs/runs.jsonl")
//!     .build()?;
//! let request = GenerateRequest::new(
//!     "models/SmolLM2-135M-Instruct.Q4_1.gguf",
//!     Prompt::Chat(vec![Message::user("Write a haiku about Rust")]),
//! )
//! .with_options(GenerateOptions {
//!     max_tokens: 64,
//!     sampling: SamplingParams::greedy(),
//!     ..GenerateOptions::default()
//! });
//! let response = runtime.generate(&request)?;
//! println!("{} ({} tokens, {:?})", response.text, response.completion_tokens, response.badge);
//! # Ok(())
//! # }
//! ```
//!
//! A chain, with the tiny seeded test VLM standing in for a real checkpoint:
//!
//! ```no_run
//! use afo_runtime::{ChainImage, ChainRequest, Runtime};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vlm = std::env::temp_dir().join("afo-doc-tiny-vlm");
//! afo_runtime::engine::TinyVlm::default().write(&vlm)?;
//! let image = ChainImage { name: "photo.jpg".into(), bytes: std::fs::read("photo.jpg")? };
//! let mut request = ChainRequest::new(&vlm, vec![image], "Describe the image.");
//! request.llm = Some("models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
//! let r = Runtime::builder().build()?.chain(&request)?;
//! println!("{}\n{}\npeak {} bytes", r.analysis, r.summary, r.peak_memory_bytes);
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! None yet.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod chain;
mod discover;
mod embed;
mod error;
mod query;
mod run;
mod runtime;
mod serving;

pub use afo_engine as engine;
pub use afo_guard as guard;
pub use afo_image as image;
pub use afo_kvcache as kvcache;
pub use afo_quant as quant;
pub use afo_select as select;
pub use afo_ssot as ssot;
pub use chain::{
    ChainImage, ChainRequest, ChainResponse, DEFAULT_SUMMARY_PROMPT, ImageReport, TokenCounts,
};
pub use discover::{FoundModel, UNSCORED_TRINITY_SCORE, card_from_model, catalog_of, find_models};
pub use embed::{EMBEDDINGS_CHAIN, EmbedInput, EmbedRequest, EmbedResponse};
pub use error::{Error, Result};
pub use query::{QueryRequest, QueryResponse};
pub use run::{Admitted, RunEstimate, RunReport};
pub use runtime::{
    GenerateRequest, GenerateResponse, Health, LoadedModelInfo, Preloaded, Prompt, Runtime,
    RuntimeBuilder,
};
pub use serving::Routed;
