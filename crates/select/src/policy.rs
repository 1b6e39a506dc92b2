//! Routing: which card serves a query.

use std::cmp::Ordering;
use std::fmt;

use afo_guard::ByteSize;
use serde::{Deserialize, Serialize};

use crate::capability::{Capabilities, Capability};
use crate::card::ModelCard;
use crate::catalog::{Catalog, Eligibility};
use crate::complexity::{Analyzer, Complexity, ComplexityReport};
use crate::error::{Error, Result};
use crate::fallback::Fallback;
use crate::task::Task;

/// The default least number of output tokens a model's context must leave after the
/// input: 64.
pub const DEFAULT_MIN_OUTPUT_TOKENS: u64 = 64;

/// A request to route: `Query::new(text)` and the setters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Query {
    /// The prompt text.
    pub text: String,
    /// Images sent with it; more than 0 requires [`Capability::Vision`].
    pub images: usize,
    /// A model asked for by id: routing is bypassed (see [`Router`]).
    pub model: Option<String>,
    /// The task, overriding the one [`analyze`](crate::analyze) infers.
    pub task: Option<Task>,
    /// The input's exact token count from the tokenizer, vision tokens included;
    /// without it the analyzer's estimate of the text is used (which counts no vision
    /// tokens).
    pub input_tokens: Option<u64>,
}

impl Query {
    /// A text query with no image, no model requested, task and tokens inferred.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }

    /// Sets the number of images. Default 0.
    pub fn images(mut self, images: usize) -> Self {
        self.images = images;
        self
    }

    /// Asks for the model `id`, bypassing routing. Default: none.
    pub fn model(mut self, id: impl Into<String>) -> Self {
        self.model = Some(id.into());
        self
    }

    /// Overrides the task. Default: inferred.
    pub fn task(mut self, task: Task) -> Self {
        self.task = Some(task);
        self
    }

    /// Gives the exact input token count. Default: estimated.
    pub fn input_tokens(mut self, tokens: u64) -> Self {
        self.input_tokens = Some(tokens);
        self
    }
}

/// What routing knows of the moment: the memory it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteContext {
    /// Bytes the model may take: the headroom under the guard's cutline. A card whose
    /// [`ModelCard::estimated_bytes`] is larger is rejected.
    pub available: ByteSize,
    /// The least number of tokens the context must leave for output after the input.
    /// Default [`DEFAULT_MIN_OUTPUT_TOKENS`].
    pub min_output_tokens: u64,
}

impl RouteContext {
    /// A context with `available` bytes of headroom.
    pub fn new(available: impl Into<ByteSize>) -> Self {
        Self {
            available: available.into(),
            min_output_tokens: DEFAULT_MIN_OUTPUT_TOKENS,
        }
    }

    /// Sets the least number of output tokens. Default [`DEFAULT_MIN_OUTPUT_TOKENS`].
    pub fn min_output_tokens(mut self, tokens: u64) -> Self {
        self.min_output_tokens = tokens;
        self
    }
}

/// Why routing turned a card down. A card may have several.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rejection {
    /// Its trinity score is below the catalog's registration floor.
    Ineligible {
        /// The card's trinity score.
        score: f32,
        /// The catalog's floor.
        min_score: f32,
    },
    /// It lacks a capability the query needs (vision for images).
    MissingCapability {
        /// What it lacks.
        missing: Capabilities,
    },
    /// Its context cannot hold the input and the least output.
    ContextTooShort {
        /// The card's context length.
        context_length: u64,
        /// Input tokens plus the least output.
        needed: u64,
    },
    /// It needs more memory than the headroom.
    TooBig {
        /// The card's bytes.
        needed_bytes: u64,
        /// The headroom.
        available_bytes: u64,
    },
    /// Its score is below the quality floor for the query's complexity.
    BelowFloor {
        /// The card's score for the task.
        score: f32,
        /// The floor.
        floor: f32,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::Ineligible { score, min_score } => {
                write!(f, "below the registration floor: {score} < {min_score}")
            }
            Rejection::MissingCapability { missing } => write!(f, "lacks {missing}"),
            Rejection::ContextTooShort {
                context_length,
                needed,
            } => write!(
                f,
                "context too short: {context_length} tokens < {needed} needed"
            ),
            Rejection::TooBig {
                needed_bytes,
                available_bytes,
            } => write!(
                f,
                "too big for the memory headroom: {} > {} available",
                ByteSize(needed_bytes),
                ByteSize(available_bytes)
            ),
            Rejection::BelowFloor { score, floor } => {
                write!(f, "below the quality floor: {score} < {floor}")
            }
        }
    }
}

/// One card as routing saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The card's id.
    pub id: String,
    /// Its score for the query's task ([`ModelCard::score_for`]).
    pub score: f32,
    /// Its estimated bytes.
    pub bytes: u64,
    /// Why it was turned down; empty when it meets every requirement.
    pub rejected: Vec<Rejection>,
}

impl Candidate {
    /// Whether the card meets every requirement.
    pub fn is_accepted(&self) -> bool {
        self.rejected.is_empty()
    }

    /// Whether the only thing wrong with the card is the quality floor.
    pub fn only_below_floor(&self) -> bool {
        !self.rejected.is_empty()
            && self
                .rejected
                .iter()
                .all(|r| matches!(r, Rejection::BelowFloor { .. }))
    }
}

/// What a query needs of a card. [`PolicyRouter`] builds one per query; a learned
/// router can use [`Requirements::check`] to apply the same hard constraints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Requirements {
    /// Capabilities the card must have.
    pub capabilities: Capabilities,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens the context must leave room for.
    pub min_output_tokens: u64,
    /// The memory headroom.
    pub available: ByteSize,
    /// The quality floor the card's [`score_for`](ModelCard::score_for) the task must
    /// reach.
    pub floor: f32,
    /// The task whose score counts.
    pub task: Task,
}

impl Requirements {
    /// `card` as seen against these requirements, every failed one listed.
    pub fn check(&self, catalog: &Catalog, card: &ModelCard) -> Candidate {
        let mut rejected = Vec::new();
        if let Eligibility::BelowMinScore { score, min_score } = catalog.eligibility(card) {
            rejected.push(Rejection::Ineligible { score, min_score });
        }
        let missing = self.capabilities.missing_from(card.capabilities());
        if !missing.is_empty() {
            rejected.push(Rejection::MissingCapability { missing });
        }
        let needed = self.input_tokens.saturating_add(self.min_output_tokens);
        if card.context_length() < needed {
            rejected.push(Rejection::ContextTooShort {
                context_length: card.context_length(),
                needed,
            });
        }
        if card.estimated_bytes() > self.available {
            rejected.push(Rejection::TooBig {
                needed_bytes: card.estimated_bytes().bytes(),
                available_bytes: self.available.bytes(),
            });
        }
        let score = card.score_for(self.task);
        if score < self.floor {
            rejected.push(Rejection::BelowFloor {
                score,
                floor: self.floor,
            });
        }
        Candidate {
            id: card.id().to_owned(),
            score,
            bytes: card.estimated_bytes().bytes(),
            rejected,
        }
    }
}

/// Why a card was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SelectionReason {
    /// The caller asked for it by id (`explicit`).
    Explicit,
    /// The cheapest card meeting every requirement and the quality floor
    /// (`meets_floor`).
    MeetsFloor,
    /// No card met the quality floor; the best-scoring one meeting every other
    /// requirement (`best_below_floor`).
    BestBelowFloor,
}

named_enum!(SelectionReason, "selection reason", {
    Explicit => "explicit",
    MeetsFloor => "meets_floor",
    BestBelowFloor => "best_below_floor",
});

/// The outcome of routing. [`Selection::summary`] is what goes into the SSOT record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The chosen card's id.
    pub model_id: String,
    /// Its score for the task.
    pub trinity_score: f32,
    /// The task that counted.
    pub task: Task,
    /// The query's analysis.
    pub complexity: ComplexityReport,
    /// The quality floor applied (none for an explicit request).
    pub floor: Option<f32>,
    /// Why this card.
    pub reason: SelectionReason,
    /// Why, in words.
    pub reason_text: String,
    /// Every card looked at, with why it was turned down.
    pub candidates: Vec<Candidate>,
    /// The fallback taken after routing, when the guard asked for one
    /// ([`Selection::apply_fallback`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// The selection as the SSOT v2 record's `selection` object holds it (same field
/// names and meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectionSummary {
    /// The model that ran.
    pub model_id: String,
    /// Why it was chosen, in words.
    pub reason: String,
    /// The model first chosen and given up for it, when a fallback was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// Its trinity score, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trinity_score: Option<f64>,
}

impl Selection {
    /// The record summary.
    pub fn summary(&self) -> SelectionSummary {
        SelectionSummary {
            model_id: self.model_id.clone(),
            reason: self.reason_text.clone(),
            fallback_from: self.fallback.as_ref().map(|f| f.fallback_from.clone()),
            // Through the shortest decimal form, so that 97.2f32 is 97.2, not
            // 97.19999694824219.
            trinity_score: Some(
                self.trinity_score
                    .to_string()
                    .parse()
                    .unwrap_or(f64::from(self.trinity_score)),
            ),
        }
    }

    /// Switches to the fallback's model, keeping the routing reason and recording
    /// where it fell back from. Applying a second fallback keeps the first model as
    /// `fallback_from`.
    pub fn apply_fallback(&mut self, fallback: Fallback) {
        let mut fallback = fallback;
        if let Some(first) = &self.fallback {
            fallback.fallback_from.clone_from(&first.fallback_from);
        }
        self.model_id.clone_from(&fallback.to);
        self.trinity_score = fallback.to_score;
        self.reason_text = format!("{}; then {}", self.reason_text, fallback.reason_text);
        self.fallback = Some(fallback);
    }
}

/// Chooses a card for a query.
///
/// An explicit request ([`Query::model`]) bypasses routing: the card is returned
/// whatever its score, size or capabilities (what routing would have objected to is
/// listed in [`Selection::candidates`] and the reason). Routing never replaces the
/// guard: the caller still estimates the run and admits it with `afo-guard`, and
/// falls back ([`fallback`](crate::fallback())) when the guard says it does not fit.
///
/// Implement it to plug in another router (a learned one, say); [`PolicyRouter`] is
/// the default.
pub trait Router {
    /// The selection for `query` among `catalog`'s cards, given `ctx`.
    fn route(&self, query: &Query, catalog: &Catalog, ctx: &RouteContext) -> Result<Selection>;
}

/// A quality floor per complexity: the score a card needs for a query of that level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityFloors {
    /// For [`Complexity::Low`]. Default 95 (any registered card).
    pub low: f32,
    /// For [`Complexity::Medium`]. Default 96.
    pub medium: f32,
    /// For [`Complexity::High`]. Default 97.
    pub high: f32,
}

impl Default for QualityFloors {
    fn default() -> Self {
        Self {
            low: 95.0,
            medium: 96.0,
            high: 97.0,
        }
    }
}

impl QualityFloors {
    /// The floor for `level`.
    pub fn get(&self, level: Complexity) -> f32 {
        match level {
            Complexity::Low => self.low,
            Complexity::Medium => self.medium,
            Complexity::High => self.high,
        }
    }
}

/// The default router: analyze the query, keep the cards that are eligible, have the
/// capabilities (vision when there are images), a context that holds the input and
/// fit the memory headroom, and of those meeting the complexity's quality floor
/// choose the cheapest:
///
/// 1. fewest [`ModelCard::estimated_bytes`];
/// 2. then the highest measured tokens/s (measured before unmeasured);
/// 3. then the fewest parameters;
/// 4. then the highest score, then the id.
///
/// When none meets the floor, the best-scoring card meeting every other requirement
/// is chosen and the reason says so ([`SelectionReason::BestBelowFloor`]). When no
/// card meets the other requirements, [`Error::NoModel`] lists every card and why.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyRouter {
    floors: QualityFloors,
    analyzer: Analyzer,
}

impl PolicyRouter {
    /// A builder.
    pub fn builder() -> PolicyRouterBuilder {
        PolicyRouterBuilder::default()
    }

    /// The quality floors.
    pub fn floors(&self) -> QualityFloors {
        self.floors
    }

    /// The analyzer.
    pub fn analyzer(&self) -> Analyzer {
        self.analyzer
    }
}

/// Builds a [`PolicyRouter`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyRouterBuilder {
    floors: QualityFloors,
    analyzer: Analyzer,
}

impl PolicyRouterBuilder {
    /// A builder with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The quality floor for `level`, 0 to 100. Defaults: see [`QualityFloors`].
    pub fn floor(mut self, level: Complexity, floor: f32) -> Self {
        match level {
            Complexity::Low => self.floors.low = floor,
            Complexity::Medium => self.floors.medium = floor,
            Complexity::High => self.floors.high = floor,
        }
        self
    }

    /// All three floors. Default [`QualityFloors::default`].
    pub fn floors(mut self, floors: QualityFloors) -> Self {
        self.floors = floors;
        self
    }

    /// The analyzer. Default [`Analyzer::default`].
    pub fn analyzer(mut self, analyzer: Analyzer) -> Self {
        self.analyzer = analyzer;
        self
    }

    /// The router, or [`Error::InvalidSetting`] for a floor outside 0..=100.
    pub fn build(self) -> Result<PolicyRouter> {
        let f = self.floors;
        for (setting, value) in [
            ("floor.low", f.low),
            ("floor.medium", f.medium),
            ("floor.high", f.high),
        ] {
            if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
                return Err(Error::InvalidSetting {
                    setting,
                    value: value.to_string(),
                    reason: "must be within 0..=100",
                });
            }
        }
        Ok(PolicyRouter {
            floors: self.floors,
            analyzer: self.analyzer,
        })
    }
}

/// Orders cards cheapest first (see [`PolicyRouter`]); a total order.
fn cheaper(a: &ModelCard, b: &ModelCard, task: Task) -> Ordering {
    let speed = |c: &ModelCard| c.tokens_per_s().unwrap_or(f32::NEG_INFINITY);
    a.estimated_bytes()
        .cmp(&b.estimated_bytes())
        .then_with(|| speed(b).total_cmp(&speed(a)))
        .then_with(|| a.params().cmp(&b.params()))
        .then_with(|| b.score_for(task).total_cmp(&a.score_for(task)))
        .then_with(|| a.id().cmp(b.id()))
}

impl Router for PolicyRouter {
    fn route(&self, query: &Query, catalog: &Catalog, ctx: &RouteContext) -> Result<Selection> {
        let report = self.analyzer.analyze(&query.text, query.images);
        let task = query.task.unwrap_or(report.task);
        let level = report.level;
        let floor = self.floors.get(level);
        let req = Requirements {
            capabilities: if query.images > 0 {
                Capabilities::TEXT.with(Capability::Vision)
            } else {
                Capabilities::TEXT
            },
            input_tokens: query.input_tokens.unwrap_or(report.features.tokens),
            min_output_tokens: ctx.min_output_tokens,
            available: ctx.available,
            floor,
            task,
        };

        if let Some(id) = &query.model {
            let card = catalog.card(id)?;
            let candidate = req.check(catalog, card);
            let mut reason_text = format!("explicitly requested `{id}`");
            if !candidate.is_accepted() {
                let objections: Vec<String> =
                    candidate.rejected.iter().map(ToString::to_string).collect();
                reason_text.push_str(&format!(
                    " (routing would have rejected it: {})",
                    objections.join(", ")
                ));
            }
            return Ok(Selection {
                model_id: card.id().to_owned(),
                trinity_score: card.score_for(task),
                task,
                complexity: report,
                floor: None,
                reason: SelectionReason::Explicit,
                reason_text,
                candidates: vec![candidate],
                fallback: None,
            });
        }

        let checked: Vec<(&ModelCard, Candidate)> =
            catalog.iter().map(|c| (c, req.check(catalog, c))).collect();
        let meets = checked
            .iter()
            .filter(|(_, cand)| cand.is_accepted())
            .map(|(c, _)| *c)
            .min_by(|a, b| cheaper(a, b, task));
        let (card, reason, reason_text) = if let Some(card) = meets {
            let text = format!(
                "cheapest model meeting the quality floor {floor} for a {level} query: \
                 `{}`, {}, score {}",
                card.id(),
                card.estimated_bytes(),
                card.score_for(task)
            );
            (card, SelectionReason::MeetsFloor, text)
        } else {
            let best = checked
                .iter()
                .filter(|(_, cand)| cand.only_below_floor())
                .map(|(c, _)| *c)
                .min_by(|a, b| {
                    b.score_for(task)
                        .total_cmp(&a.score_for(task))
                        .then_with(|| cheaper(a, b, task))
                });
            let Some(card) = best else {
                return Err(Error::NoModel {
                    complexity: level,
                    candidates: checked.into_iter().map(|(_, cand)| cand).collect(),
                });
            };
            let text = format!(
                "no model meets the quality floor {floor} for a {level} query; chose the \
                 best-scoring one that fits: `{}`, score {}",
                card.id(),
                card.score_for(task)
            );
            (card, SelectionReason::BestBelowFloor, text)
        };
        tracing::debug!(model = card.id(), %level, %reason, "model selected");
        Ok(Selection {
            model_id: card.id().to_owned(),
            trinity_score: card.score_for(task),
            task,
            complexity: report,
            floor: Some(floor),
            reason,
            reason_text,
            candidates: checked.into_iter().map(|(_, cand)| cand).collect(),
            fallback: None,
        })
    }
}
