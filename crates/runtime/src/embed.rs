//! Embedding runs: [`Runtime::embed`] turns texts or token ids into pooled,
//! normalised vectors ([`afo_engine::embed()`]) through the one run context.
//!
//! An embedding run is estimated by the one estimator
//! ([`Runtime::estimate_embeddings`]: activations of a prefill chunk and a KV cache of
//! the longest input's tokens, no logits, no generated tokens), admitted on the
//! ledger like any run, and writes one SSOT record (`chain: "embeddings"`), refused
//! and failed runs included.

use std::path::PathBuf;
use std::time::Instant;

use afo_engine::EmbedOptions;
use afo_guard::{PeakTracker, PlanOption};
use afo_quant::QuantScheme;

use crate::error::{Error, Result};
use crate::run::RunReport;
use crate::runtime::Runtime;

/// The SSOT `chain` of an embedding run.
pub const EMBEDDINGS_CHAIN: &str = "embeddings";

/// One input to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenized by the model's tokenizer.
    Text(String),
    /// Token ids of the model's vocabulary, as they are.
    Tokens(Vec<u32>),
}

/// An embedding request. [`EmbedRequest::new`] sets the defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbedRequest {
    /// The model: a GGUF file or a Hugging Face model directory.
    pub model: PathBuf,
    /// Quantize the attention and MLP weights to this scheme while loading; `None`
    /// runs the weights as stored.
    pub scheme: Option<QuantScheme>,
    /// The inputs, each embedded on its own.
    pub inputs: Vec<EmbedInput>,
    /// Pooling and dimensions (default: last-token pooling, the hidden size).
    pub options: EmbedOptions,
    /// The most tokens all inputs may have together; `None` (the default): no limit
    /// beyond each input's context.
    pub max_total_tokens: Option<usize>,
}

impl EmbedRequest {
    /// A request to embed `inputs` on `model` as stored, with
    /// [`EmbedOptions::default`].
    pub fn new(model: impl Into<PathBuf>, inputs: Vec<EmbedInput>) -> Self {
        Self {
            model: model.into(),
            scheme: None,
            inputs,
            options: EmbedOptions::default(),
            max_total_tokens: None,
        }
    }

    /// The same request, refused when its inputs have more than `limit` tokens in
    /// all.
    pub fn with_max_total_tokens(mut self, limit: usize) -> Self {
        self.max_total_tokens = Some(limit);
        self
    }

    /// The same request with these options.
    pub fn with_options(mut self, options: EmbedOptions) -> Self {
        self.options = options;
        self
    }

    /// The same request, quantizing the weights to `scheme` while loading.
    pub fn with_scheme(mut self, scheme: QuantScheme) -> Self {
        self.scheme = Some(scheme);
        self
    }
}

/// What an embedding run produced and cost.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbedResponse {
    /// The run's id (also in the SSOT record).
    pub run_id: String,
    /// The model's id.
    pub model_id: String,
    /// One unit-length vector per input, in order.
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens of each input, in order.
    pub input_tokens: Vec<usize>,
    /// The peak predicted before the run, in bytes.
    pub predicted_peak_bytes: u64,
    /// The measured peak resident memory, in bytes.
    pub peak_memory_bytes: u64,
    /// Wall time of the whole call, in milliseconds.
    pub latency_ms: f64,
    /// How the ledger admitted the run.
    pub admission: afo_ssot::AdmissionRecord,
}

impl EmbedResponse {
    /// Tokens of all inputs together.
    pub fn prompt_tokens(&self) -> usize {
        self.input_tokens.iter().sum()
    }
}

impl Runtime {
    /// Embeds each input of `request` (see [`afo_engine::embed()`] for pooling,
    /// normalisation and `dimensions`). The run is estimated and admitted on the
    /// ledger as every run is; every call, successful or not, appends one SSOT v2
    /// record when a log is configured.
    ///
    /// # Errors
    /// [`Error::EmbedInput`] for an input that is empty, has a token id outside the
    /// vocabulary or is longer than the model's context (naming the input);
    /// [`Error::EmbedTooManyTokens`] past [`EmbedRequest::max_total_tokens`];
    /// [`Error::Refused`] when the run does not fit under the cutline; the engine's
    /// errors (loading, bad `dimensions`).
    pub fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse> {
        let start = Instant::now();
        let run_id = self.next_run_id();
        let tracker = PeakTracker::start(Some(self.ledger.clone()));
        let result = self.run_embed(request, &run_id);
        let peak = tracker.finish();
        afo_guard::release_free_memory();
        let latency_ms = start.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok((mut response, acquire)) => {
                response.peak_memory_bytes = peak;
                response.latency_ms = latency_ms;
                let mut report = RunReport::new(&run_id, EMBEDDINGS_CHAIN, &response.model_id);
                report.latency_ms = latency_ms;
                report.peak_memory_bytes = peak;
                report.tokens_in = response.prompt_tokens() as u64;
                report.predicted_peak_bytes = Some(response.predicted_peak_bytes);
                match acquire {
                    (true, ms) => report.reload_overhead_ms = Some(ms),
                    (false, ms) => report.load_ms = Some(ms),
                }
                report.admission = Some(response.admission.clone());
                self.record(&report)?;
                Ok(response)
            }
            Err(err) => {
                let model_id = request
                    .model
                    .file_stem()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                let mut report = RunReport::new(&run_id, EMBEDDINGS_CHAIN, model_id);
                report.error = Some(err.to_string());
                report.latency_ms = latency_ms;
                report.peak_memory_bytes = peak;
                report.admission = err.admission_record();
                self.record(&report)?;
                Err(err)
            }
        }
    }

    /// The run without its record: the response and (cache hit, acquire ms).
    fn run_embed(
        &self,
        request: &EmbedRequest,
        run_id: &str,
    ) -> Result<(EmbedResponse, (bool, f64))> {
        let acquired = self.acquire(&request.model, request.scheme, None)?;
        let loaded = &acquired.model;
        let model = loaded.model();
        let config = model.config();
        request.options.output_len(config.hidden_size)?;
        let bad = |index: usize, reason: String| Error::EmbedInput { index, reason };
        // A text longer than the context could hold even at the longest token's
        // length is refused on its bytes, before it is tokenized.
        let most_bytes = config
            .max_position
            .saturating_mul(loaded.tokenizer().max_token_bytes());
        let mut inputs = Vec::with_capacity(request.inputs.len());
        let mut total = 0usize;
        for (index, input) in request.inputs.iter().enumerate() {
            let tokens = match input {
                EmbedInput::Text(text) if text.len() > most_bytes => {
                    return Err(bad(
                        index,
                        format!(
                            "it has {} bytes; the model's context holds at most {} tokens of at most {} bytes each",
                            text.len(),
                            config.max_position,
                            loaded.tokenizer().max_token_bytes()
                        ),
                    ));
                }
                EmbedInput::Text(text) => loaded.encode_text(text)?,
                EmbedInput::Tokens(ids) => ids.clone(),
            };
            if tokens.is_empty() {
                return Err(bad(index, "it has no tokens".to_owned()));
            }
            if let Some(id) = tokens.iter().find(|&&id| id as usize >= config.vocab_size) {
                return Err(bad(
                    index,
                    format!(
                        "token id {id} is outside the vocabulary of {} tokens",
                        config.vocab_size
                    ),
                ));
            }
            if tokens.len() > config.max_position {
                return Err(bad(
                    index,
                    format!(
                        "it has {} tokens; the model's context holds at most {}",
                        tokens.len(),
                        config.max_position
                    ),
                ));
            }
            total += tokens.len();
            if let Some(limit) = request.max_total_tokens.filter(|&l| total > l) {
                return Err(Error::EmbedTooManyTokens {
                    tokens: total,
                    limit,
                });
            }
            inputs.push(tokens);
        }
        let longest = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let estimate = self.estimate_embeddings(model, longest, inputs.len());
        let plan = [PlanOption::new("as asked", estimate.parts)];
        let admitted = self
            .admit(&plan)
            .map_err(|(refusal, tried)| Error::Refused { refusal, tried })?;
        tracing::debug!(estimate = %estimate.estimate, run_id, "embedding run admitted");
        let embeddings = inputs
            .iter()
            .map(|tokens| afo_engine::embed(model, tokens, &request.options))
            .collect::<afo_engine::Result<Vec<_>>>()?;
        drop(admitted.reservation);
        Ok((
            EmbedResponse {
                run_id: run_id.to_owned(),
                model_id: loaded.id().to_owned(),
                embeddings,
                input_tokens: inputs.iter().map(Vec::len).collect(),
                predicted_peak_bytes: admitted.predicted_peak_bytes,
                peak_memory_bytes: 0,
                latency_ms: 0.0,
                admission: admitted.record,
            },
            (acquired.hit, acquired.acquire_ms),
        ))
    }
}
