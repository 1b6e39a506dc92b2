//! `Runtime::query`: route a query to a model of the catalog, step down the fallback
//! ladder when memory is short, budget the tokens, generate, and record why.

use std::ops::ControlFlow;
use std::path::PathBuf;

use afo_engine::{GenerateOptions, Message, SamplingParams};
use afo_quant::QuantScheme;
use afo_select::{
    Budget, BudgetRequest, ModelCard, Query, RouteContext, Selection, TokenBudget, fallback,
};

use crate::error::{Error, Result};
use crate::runtime::{GenerateRequest, GenerateResponse, Prompt, Runtime};

/// A query for [`Runtime::query`]: the user's text, and what the caller overrides.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct QueryRequest {
    /// The user's message.
    pub text: String,
    /// Images attached (counted for routing; the vision path is not wired yet).
    pub images: usize,
    /// An explicit model id: bypasses routing, not the memory guard.
    pub model: Option<String>,
    /// The caller's `max_tokens` (still cut to the context and the KV headroom).
    pub max_tokens: Option<usize>,
    /// The caller's temperature (always wins over the task's).
    pub temperature: Option<f32>,
    /// Sampling seed (default 0, so that a query is reproducible).
    pub seed: Option<u64>,
}

impl QueryRequest {
    /// A query of `text` with no overrides.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }
}

/// What [`Runtime::query`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueryResponse {
    /// The generation, with its measured timings, peak, badge and score.
    pub response: GenerateResponse,
    /// How the model was chosen: complexity, candidates, reason, any fallback.
    pub selection: Selection,
    /// The token budget and temperature the run was given, and what bound them.
    pub budget: Budget,
}

impl QueryResponse {
    /// The id of the catalog card that ran.
    pub fn model_id(&self) -> &str {
        &self.selection.model_id
    }

    /// Its trinity score.
    pub fn trinity_score(&self) -> f32 {
        self.selection.trinity_score
    }
}

/// The afo-quant scheme of a card (`None`: run the file as stored).
fn card_scheme(card: &ModelCard) -> Result<Option<QuantScheme>> {
    let name = card.quant().to_string();
    let scheme: QuantScheme = name.parse().map_err(|_| Error::CardNotLoadable {
        id: card.id().to_owned(),
        reason: format!("scheme `{name}` is not one the runtime loads"),
    })?;
    Ok(Some(scheme))
}

impl Runtime {
    /// Answers a query with the model the router picks from the catalog.
    ///
    /// Before the run: the query's complexity and task, the cheapest card that meets
    /// the quality floor and fits the memory left under the cutline, a step down the
    /// fallback ladder (bigger to smaller, int8 to int4) whenever the chosen card does
    /// not fit or the guard refuses it, and a token budget from the input, the task,
    /// the context left and the KV headroom. After: the measured peak, badge and
    /// score. The SSOT record carries the selection (with `fallback_from` and the
    /// reason), the token budget and the predicted peak.
    ///
    /// A card's `source` is the model file or directory; a card whose file is stored
    /// in another scheme than the card's `quant` is quantized while loading, unless
    /// the file's layers are stored in that scheme already.
    ///
    /// # Errors
    /// [`Error::NoCatalog`], [`Error::Select`] when no card qualifies or no smaller
    /// variant fits, [`Error::CardNotLoadable`], and the errors of
    /// [`Runtime::generate`].
    pub fn query(&self, request: &QueryRequest) -> Result<QueryResponse> {
        let catalog = self.catalog.as_ref().ok_or(Error::NoCatalog)?;
        let headroom = self.headroom();
        let mut query = Query::new(request.text.clone()).images(request.images);
        if let Some(id) = &request.model {
            query = query.model(id.clone());
        }
        let mut selection = self
            .router
            .route(&query, catalog, &RouteContext::new(headroom))?;
        // Each pass either runs the chosen card or steps one rung down the ladder.
        loop {
            let card = catalog.card(&selection.model_id)?;
            let path = PathBuf::from(card.source().ok_or_else(|| Error::CardNotLoadable {
                id: card.id().to_owned(),
                reason: "the card has no `source` file".into(),
            })?);
            // `None` (run as stored) when the file's layers are in the card's scheme.
            let scheme = card_scheme(card)?.filter(|&s| self.stored_scheme(&path) != Some(s));
            let bytes = card.estimated_bytes().0;
            let loaded = self.is_loaded(&path, scheme);
            if !loaded && bytes > headroom {
                let step = fallback(catalog, card.id(), headroom.into())?;
                tracing::info!(from = card.id(), to = %step.to, "fallback: {}", step.reason_text);
                selection.apply_fallback(step);
                continue;
            }
            match self.run_card(request, card, &path, scheme, &selection) {
                Err(Error::Refused { refusal, tried }) => {
                    let step = fallback(catalog, card.id(), headroom.into())
                        .map_err(|_| Error::Refused { refusal, tried })?;
                    tracing::info!(from = card.id(), to = %step.to, %refusal, "fallback after refusal");
                    selection.apply_fallback(step);
                }
                Err(Error::Engine(afo_engine::Error::ModelTooLarge { .. })) => {
                    let step = fallback(catalog, card.id(), headroom.into())?;
                    selection.apply_fallback(step);
                }
                Err(e) => return Err(e),
                Ok((response, budget)) => {
                    return Ok(QueryResponse {
                        response,
                        selection,
                        budget,
                    });
                }
            }
        }
    }

    fn run_card(
        &self,
        request: &QueryRequest,
        card: &ModelCard,
        path: &std::path::Path,
        scheme: Option<QuantScheme>,
        selection: &Selection,
    ) -> Result<(GenerateResponse, Budget)> {
        let acquired = self.acquire(path, scheme, Some(card.estimated_bytes().0))?;
        let loaded = &acquired.model;
        let messages = vec![Message::user(request.text.clone())];
        let input_tokens = loaded.encode_chat(&messages)?.len() as u64;
        let c = loaded.model().config();
        let kv_per_token = loaded.model().kv_bytes_per_token();
        let headroom = self.memory().available();
        let mut want = BudgetRequest::new(
            selection.task,
            input_tokens,
            card.context_length().min(c.max_position as u64),
        )
        .kv_headroom(headroom, kv_per_token);
        if let Some(m) = request.max_tokens {
            want = want.max_tokens(m as u64);
        }
        if let Some(t) = request.temperature {
            want = want.temperature(t);
        }
        let budget = TokenBudget::default().plan(&want)?;
        drop(acquired);
        let sampling = SamplingParams::builder()
            .temperature(budget.temperature)
            .seed(request.seed.unwrap_or(0))
            .build()?;
        let mut generate =
            GenerateRequest::new(path, Prompt::Chat(messages)).with_options(GenerateOptions {
                max_tokens: budget.max_tokens as usize,
                sampling,
                ..GenerateOptions::default()
            });
        generate.scheme = scheme;
        let summary = selection.summary();
        let record = afo_ssot::Selection {
            model_id: summary.model_id,
            reason: summary.reason,
            fallback_from: summary.fallback_from,
            trinity_score: summary.trinity_score,
        };
        let response =
            self.generate_selected(&generate, Some(record), |_| ControlFlow::Continue(()))?;
        Ok((response, budget))
    }
}
