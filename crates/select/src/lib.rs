//! Model selection for afo: which model serves a query, and with what budget.
//!
//! - [`ModelCard`]: one model's id, family, parameters, [`QuantScheme`],
//!   [`Capabilities`], quality ("trinity") score 0-100 with optional per-[`Task`]
//!   scores, context length, estimated bytes ([`estimate_bytes`] computes them with
//!   `afo-guard`'s estimator), measured speed, source and `variant_of`.
//! - [`Catalog`]: the cards, from TOML or JSON files ([`Catalog::from_path`]) or from
//!   code ([`Catalog::builder`], [`Catalog::push`]); ids are unique, and a
//!   registration floor ([`Catalog::min_score`], default 95) decides which cards are
//!   [`Eligibility::Eligible`].
//! - [`analyze`]: a query's [`Complexity`] (low, medium, high), score, inferred task
//!   and counted [`Features`], by a documented formula ([`Analyzer`]).
//! - [`Router`] and its default [`PolicyRouter`]: the cheapest eligible card that has
//!   the capabilities, the context and the memory the query needs and meets the
//!   [`QualityFloors`] of its complexity, with every [`Candidate`] and [`Rejection`]
//!   in the [`Selection`].
//! - [`fallback_ladder`] and [`fallback`]: cheaper variants of a model (4B -> 2B,
//!   int8 -> int4) when the memory is short, recorded as a [`Fallback`].
//! - [`TokenBudget`]: `max_tokens` and temperature per task, cut to the context and
//!   the KV headroom, with the [`BudgetBound`] that set it.
//!
//! [`Selection::summary`], [`Fallback`] and [`Budget`] serialise to what the runtime
//! writes into its SSOT record.
//!
//! # Example
//!
//! ```
//! use afo_select::{
//!     fallback, BudgetRequest, Catalog, Complexity, PolicyRouter, Query, RouteContext,
//!     Router, SelectionReason, TokenBudget,
//! };
//!
//! let catalog = Catalog::from_toml_str(r#"
//!     [[models]]
//!     id = "tiny-int8"
//!     family = "tiny"
//!     params = 135000000
//!     quant = "int8"
//!     trinity_score = 96.0
//!     context_length = 8192
//!     estimated_bytes = "300MB"
//!
//!     [[models]]
//!     id = "tiny-int4"
//!     family = "tiny"
//!     params = 135000000
//!     quant = "int4"
//!     trinity_score = 95.5
//!     context_length = 8192
//!     estimated_bytes = "200MB"
//!     variant_of = "tiny-int8"
//! "#)?;
//!
//! // A medium query needs a score of 96: the int8 card, the cheapest that meets it.
//! let query = Query::new("Explain how a TCP handshake works.");
//! let router = PolicyRouter::default();
//! let mut selection = router.route(&query, &catalog, &RouteContext::new(1u64 << 30))?;
//! assert_eq!(selection.complexity.level, Complexity::Medium);
//! assert_eq!(selection.model_id, "tiny-int8");
//! assert_eq!(selection.reason, SelectionReason::MeetsFloor);
//!
//! // The guard finds only 250 MB: step down the ladder.
//! let step = fallback(&catalog, &selection.model_id, 250_000_000u64.into())?;
//! selection.apply_fallback(step);
//! let summary = selection.summary();
//! assert_eq!(summary.model_id, "tiny-int4");
//! assert_eq!(summary.fallback_from.as_deref(), Some("tiny-int8"));
//!
//! // How much to generate, and how hot.
//! let budget = TokenBudget::default().plan(&BudgetRequest::new(selection.task, 12, 8192))?;
//! assert!(budget.max_tokens >= 1 && budget.temperature > 0.0);
//! # Ok::<(), afo_select::Error>(())
//! ```
//!
//! # Features
//!
//! None. The crate is pure computation: it reads catalog files when asked and nothing
//! else, and emits `tracing` events for its choices.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

#[macro_use]
mod names;

mod budget;
mod capability;
mod card;
mod catalog;
mod complexity;
mod error;
mod fallback;
mod policy;
mod scheme;
mod task;

pub use budget::{Budget, BudgetBound, BudgetRequest, TaskBudget, TokenBudget, TokenBudgetBuilder};
pub use capability::{Capabilities, Capability};
pub use card::{ModelCard, ModelCardBuilder, REFERENCE_CONTEXT_TOKENS, estimate_bytes};
pub use catalog::{Catalog, CatalogBuilder, DEFAULT_MIN_SCORE, Eligibility};
pub use complexity::{
    Analyzer, Complexity, ComplexityReport, DEFAULT_HIGH_AT, DEFAULT_MEDIUM_AT, Features, analyze,
};
pub use error::{Error, Result};
pub use fallback::{Fallback, FallbackReason, fallback, fallback_ladder};
pub use policy::{
    Candidate, DEFAULT_MIN_OUTPUT_TOKENS, PolicyRouter, PolicyRouterBuilder, QualityFloors, Query,
    Rejection, Requirements, RouteContext, Router, Selection, SelectionReason, SelectionSummary,
};
pub use scheme::QuantScheme;
pub use task::Task;
