//! What a run returns to Python: `GenerateResult`, `ChainResult`, `QueryResult`.
//! Each keeps the Rust response and builds its dicts on access.

use afo_runtime::{ChainResponse, GenerateResponse, QueryResponse, TokenCounts};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::admission_dict;

fn usage<'py>(py: Python<'py>, prompt: usize, completion: usize) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("prompt_tokens", prompt)?;
    d.set_item("completion_tokens", completion)?;
    d.set_item("total_tokens", prompt + completion)?;
    Ok(d)
}

/// The result of `Runtime.generate` (and of a `Stream` once exhausted): the text, why
/// it ended, and what the run cost, as written to the SSOT log.
#[pyclass(module = "afo", frozen)]
#[derive(Debug)]
pub struct GenerateResult {
    pub(crate) inner: GenerateResponse,
}

#[pymethods]
impl GenerateResult {
    /// The generated text.
    #[getter]
    fn text(&self) -> &str {
        &self.inner.text
    }

    /// Why the run ended: "stop" (end of sequence or a stop string), "length"
    /// (max_tokens reached) or "cancelled".
    #[getter]
    fn finish_reason(&self) -> &'static str {
        self.inner.finish.as_openai()
    }

    /// Token counts: {"prompt_tokens", "completion_tokens", "total_tokens"}.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        usage(py, self.inner.prompt_tokens, self.inner.completion_tokens)
    }

    /// Timings in milliseconds and rates: ttft_ms (from the call, model acquire
    /// included; None when no token came), latency_ms (the whole call inside the
    /// runtime), prefill_ms, decode_ms, generate_ms (prefill and decode),
    /// acquire_ms (load on a miss, re-acquire on a hit), tokens_per_s (decode; None
    /// with fewer than two tokens) and prefill_tokens_per_s.
    #[getter]
    fn timings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.inner;
        let d = PyDict::new(py);
        d.set_item("ttft_ms", r.timings.ttft_ms)?;
        d.set_item("latency_ms", r.latency_ms)?;
        d.set_item("prefill_ms", r.timings.prefill_ms)?;
        d.set_item("decode_ms", r.timings.decode_ms)?;
        d.set_item("generate_ms", r.timings.total_ms)?;
        d.set_item("acquire_ms", r.acquire_ms)?;
        d.set_item("tokens_per_s", r.tokens_per_s)?;
        d.set_item(
            "prefill_tokens_per_s",
            r.timings.prefill_tokens_per_s(r.prompt_tokens),
        )?;
        Ok(d)
    }

    /// The badge of the measured peak against the cutline: "SAFE", "WARN" or
    /// "OVER_CUTLINE".
    #[getter]
    fn badge(&self) -> &'static str {
        self.inner.badge.as_str()
    }

    /// The health score of the run, 0-100.
    #[getter]
    fn health_score(&self) -> f64 {
        self.inner.health_score
    }

    /// The measured peak resident memory of the run, in bytes.
    #[getter]
    fn peak_memory_bytes(&self) -> u64 {
        self.inner.peak_memory_bytes
    }

    /// The peak predicted before the run, in bytes.
    #[getter]
    fn predicted_peak_bytes(&self) -> u64 {
        self.inner.predicted_peak_bytes
    }

    /// The cutline in force, in bytes.
    #[getter]
    fn cutline_bytes(&self) -> u64 {
        self.inner.cutline_bytes
    }

    /// The run's id, as in its SSOT record.
    #[getter]
    fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// The model's id.
    #[getter]
    fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// Prompt tokens whose keys and values came from the model's prefix cache.
    #[getter]
    fn prefix_cache_hit_tokens(&self) -> u64 {
        self.inner.prefix_cache_hit_tokens
    }

    /// Whether the model was loaded already.
    #[getter]
    fn cache_hit(&self) -> bool {
        self.inner.cache_hit
    }

    /// The max_tokens the run was given (lower than asked when the ledger degraded
    /// the run).
    #[getter]
    fn token_budget(&self) -> usize {
        self.inner.token_budget
    }

    /// How the ledger admitted the run: {"decision", "plan", "tried",
    /// "reserved_bytes", "run_bytes", "unaccounted_bytes"}.
    #[getter]
    fn admission<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        admission_dict(py, &self.inner.admission)
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "GenerateResult(model_id={:?}, finish_reason={:?}, completion_tokens={}, badge={:?}, peak_memory_bytes={}, run_id={:?}, text={:?})",
            r.model_id,
            r.finish.as_openai(),
            r.completion_tokens,
            r.badge.as_str(),
            r.peak_memory_bytes,
            r.run_id,
            preview(&r.text),
        )
    }
}

/// The first 60 characters of a text, for a repr.
fn preview(text: &str) -> String {
    let mut out: String = text.chars().take(60).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

fn tokens<'py>(py: Python<'py>, t: TokenCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("prompt", t.prompt)?;
    d.set_item("generated", t.generated)?;
    Ok(d)
}

/// The result of `Runtime.chain`: the VLM's analysis of the images, the summary, each
/// stage's time and the run's memory, as written to the SSOT log.
#[pyclass(module = "afo", frozen)]
#[derive(Debug)]
pub struct ChainResult {
    pub(crate) inner: ChainResponse,
}

#[pymethods]
impl ChainResult {
    /// The run's id, as in its SSOT record.
    #[getter]
    fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// The VLM's description of the images.
    #[getter]
    fn analysis(&self) -> &str {
        &self.inner.analysis
    }

    /// The summary.
    #[getter]
    fn summary(&self) -> &str {
        &self.inner.summary
    }

    /// The VLM's id.
    #[getter]
    fn vlm_id(&self) -> &str {
        &self.inner.vlm_id
    }

    /// The summary model's id.
    #[getter]
    fn llm_id(&self) -> &str {
        &self.inner.llm_id
    }

    /// Whether one loaded instance served both stages.
    #[getter]
    fn shared_instance(&self) -> bool {
        self.inner.shared_instance
    }

    /// The stages in order, each {"name", "model_id", "latency_ms", "tokens_in",
    /// "tokens_out"}.
    #[getter]
    fn stages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for s in &self.inner.stages {
            let d = PyDict::new(py);
            d.set_item("name", &s.name)?;
            d.set_item("model_id", &s.model_id)?;
            d.set_item("latency_ms", s.latency_ms)?;
            d.set_item("tokens_in", s.tokens_in)?;
            d.set_item("tokens_out", s.tokens_out)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Per image: {"name", "original" (w, h), "resized" (w, h), "grid_thw",
    /// "image_tokens", "compression_ratio"}.
    #[getter]
    fn images<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for i in &self.inner.images {
            let d = PyDict::new(py);
            d.set_item("name", &i.name)?;
            d.set_item("original", i.original)?;
            d.set_item("resized", i.resized)?;
            d.set_item("grid_thw", i.grid_thw.to_vec())?;
            d.set_item("image_tokens", i.image_tokens)?;
            d.set_item("compression_ratio", i.compression_ratio)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Pixels fed to the vision encoder, all images.
    #[getter]
    fn image_pixels(&self) -> u64 {
        self.inner.image_pixels
    }

    /// Pixels of the input images.
    #[getter]
    fn original_pixels(&self) -> u64 {
        self.inner.original_pixels
    }

    /// Input bytes over re-encoded bytes, all images (None when not re-encoded).
    #[getter]
    fn compression_ratio(&self) -> Option<f64> {
        self.inner.compression_ratio
    }

    /// The analysis stage's tokens: {"prompt" (image tokens included), "generated"}.
    #[getter]
    fn analysis_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        tokens(py, self.inner.analysis_tokens)
    }

    /// The summary stage's tokens: {"prompt", "generated"}.
    #[getter]
    fn summary_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        tokens(py, self.inner.summary_tokens)
    }

    /// The peak predicted before the run, in bytes.
    #[getter]
    fn predicted_peak_bytes(&self) -> u64 {
        self.inner.predicted_peak_bytes
    }

    /// The measured peak resident memory, in bytes.
    #[getter]
    fn peak_memory_bytes(&self) -> u64 {
        self.inner.peak_memory_bytes
    }

    /// The cutline in force, in bytes.
    #[getter]
    fn cutline_bytes(&self) -> u64 {
        self.inner.cutline_bytes
    }

    /// "SAFE", "WARN" or "OVER_CUTLINE".
    #[getter]
    fn badge(&self) -> &'static str {
        self.inner.badge.as_str()
    }

    /// The health score, 0-100.
    #[getter]
    fn health_score(&self) -> f64 {
        self.inner.health_score
    }

    /// Wall time of the whole chain inside the runtime, in milliseconds.
    #[getter]
    fn latency_ms(&self) -> f64 {
        self.inner.latency_ms
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "ChainResult(vlm_id={:?}, llm_id={:?}, images={}, badge={:?}, peak_memory_bytes={}, run_id={:?}, summary={:?})",
            r.vlm_id,
            r.llm_id,
            r.images.len(),
            r.badge.as_str(),
            r.peak_memory_bytes,
            r.run_id,
            preview(&r.summary),
        )
    }
}

/// The result of `Runtime.query`: which catalog model answered and why, the token
/// budget it was given, and the generation (`result`).
#[pyclass(module = "afo", frozen)]
#[derive(Debug)]
pub struct QueryResult {
    pub(crate) inner: QueryResponse,
}

#[pymethods]
impl QueryResult {
    /// The id of the catalog card that ran.
    #[getter]
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }

    /// Why the router chose it (a sentence).
    #[getter]
    fn reason(&self) -> &str {
        &self.inner.selection.reason_text
    }

    /// The card first chosen when the run fell back to a smaller one, else None.
    #[getter]
    fn fallback_from(&self) -> Option<String> {
        self.inner.selection.summary().fallback_from
    }

    /// The card's trinity score.
    #[getter]
    fn trinity_score(&self) -> f32 {
        self.inner.trinity_score()
    }

    /// The task the query was classified as.
    #[getter]
    fn task(&self) -> String {
        self.inner.selection.task.to_string()
    }

    /// The query's complexity level.
    #[getter]
    fn complexity(&self) -> String {
        self.inner.selection.complexity.level.to_string()
    }

    /// The max_tokens the run was given.
    #[getter]
    fn max_tokens(&self) -> u64 {
        self.inner.budget.max_tokens
    }

    /// The temperature the run was given.
    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.budget.temperature
    }

    /// The generated text.
    #[getter]
    fn text(&self) -> &str {
        &self.inner.response.text
    }

    /// "stop", "length" or "cancelled".
    #[getter]
    fn finish_reason(&self) -> &'static str {
        self.inner.response.finish.as_openai()
    }

    /// Token counts: {"prompt_tokens", "completion_tokens", "total_tokens"}.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.inner.response;
        usage(py, r.prompt_tokens, r.completion_tokens)
    }

    /// The run's id, as in its SSOT record.
    #[getter]
    fn run_id(&self) -> &str {
        &self.inner.response.run_id
    }

    /// "SAFE", "WARN" or "OVER_CUTLINE".
    #[getter]
    fn badge(&self) -> &'static str {
        self.inner.response.badge.as_str()
    }

    /// The generation itself, with its timings and memory.
    #[getter]
    fn result(&self) -> GenerateResult {
        GenerateResult {
            inner: self.inner.response.clone(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "QueryResult(model_id={:?}, reason={:?}, fallback_from={:?}, max_tokens={}, text={:?})",
            self.inner.model_id(),
            self.inner.selection.reason_text,
            self.inner.selection.summary().fallback_from,
            self.inner.budget.max_tokens,
            preview(&self.inner.response.text),
        )
    }
}
