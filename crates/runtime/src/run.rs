//! The one run context: estimate, admit (or degrade, or refuse), measure, record.
//!
//! Every run of the runtime goes through here: [`Runtime::generate`],
//! [`Runtime::generate_stream`], [`Runtime::query`], [`Runtime::chain`],
//! [`Runtime::embed`] and the server's batching and vision workers.
//!
//! - **One estimator**: [`Runtime::estimate_text`], [`Runtime::estimate_vision`] and
//!   [`Runtime::estimate_embeddings`]
//!   run the guard's [`Estimator`] on the model's own shape and its own
//!   `kv_bytes_per_token` ([`afo_engine::Model::kv_bytes_per_token`]).
//! - **One admission**: [`Runtime::admit`] asks the ledger for the first plan that
//!   fits (the plan asked for, then the cheaper ones: a KV budget with attention
//!   sinks, a smaller `max_tokens` from the KV headroom), making room first by
//!   dropping prefix-cache blocks, evicting idle models least recently used and
//!   returning the allocator's free memory, and refuses with the numbers otherwise.
//! - **One record**: [`Runtime::record`] turns a [`RunReport`] into the SSOT v2 record
//!   (badge, health score, admission, unaccounted memory), appends it, and returns it.

use afo_engine::Model;
use afo_guard::{
    Admission, Estimate, HealthInputs, KindBytes, MemoryKind, ModelShape, PlanOption, Refusal,
    Reservation, RunOutput, RunPlan, Weights, badge, health_score,
};
use afo_kvcache::PrunePolicy;
use afo_ssot::{
    AdmissionRecord, Record, RecordV1, RecordV2, RunStatus, Selection, Stage, Timestamp,
};

use crate::error::Result;
use crate::runtime::Runtime;

/// A run's predicted memory: the estimator's breakdown and what the run reserves.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunEstimate {
    /// The estimator's breakdown; `total` is the peak of the run alone in a fresh
    /// process (weights, runtime overhead and the run's own bytes).
    pub estimate: Estimate,
    /// What the run reserves in the ledger (KV cache, workspace, images); the
    /// weights are reserved by the model's load.
    pub parts: KindBytes,
    /// The workspace the run keeps once its prompt has run (logits and one decode
    /// step's activations).
    pub decode_workspace: u64,
}

impl RunEstimate {
    /// The bytes the run reserves.
    pub fn run_bytes(&self) -> u64 {
        self.parts.total()
    }
}

/// A plan for a text run: the token budget and KV cache it runs with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TextPlan {
    pub name: String,
    pub max_tokens: usize,
    pub kv_budget: Option<(usize, PrunePolicy)>,
    pub estimate: RunEstimate,
}

impl TextPlan {
    /// The KV cache the plan runs with, for a prompt of `prompt_tokens`.
    pub(crate) fn new_cache(&self, model: &Model, prompt_tokens: usize) -> afo_kvcache::KvCache {
        match self.kv_budget {
            Some((budget, policy)) => {
                model.new_pruned_cache(prompt_tokens + self.max_tokens, Some(budget), policy)
            }
            None => model.new_cache(prompt_tokens + self.max_tokens),
        }
    }
}

/// An admitted run: its bytes, held until dropped, and how it was admitted.
#[derive(Debug)]
#[non_exhaustive]
pub struct Admitted {
    /// The run's bytes in the ledger.
    pub reservation: Reservation,
    /// Which plan ran (0: the one asked for).
    pub index: usize,
    /// The resident memory the run is predicted to reach (never above the cutline).
    pub predicted_peak_bytes: u64,
    /// How it was decided, for the record.
    pub record: AdmissionRecord,
}

/// The guard's view of a decoder's shape.
pub(crate) fn model_shape(c: &afo_engine::ModelConfig) -> ModelShape {
    ModelShape {
        layers: c.num_layers as u64,
        hidden: c.hidden_size as u64,
        intermediate: c.intermediate_size as u64,
        heads: c.num_heads as u64,
        kv_heads: c.num_kv_heads as u64,
        head_dim: c.head_dim as u64,
        vocab: c.vocab_size as u64,
    }
}

/// The smallest KV budget a degraded plan uses, in tokens: room for a prefill chunk
/// and the sinks.
const MIN_KV_BUDGET: usize = 256;
/// Attention sinks kept by a degraded plan's KV budget.
const SINK_TOKENS: usize = 4;

impl Runtime {
    fn estimate_plan(&self, plan: &RunPlan) -> RunEstimate {
        let estimate = self.estimator.estimate(plan);
        let parts = self.estimator.run_parts(&estimate);
        // After the prompt: one token per sequence through the model.
        let decode = self.estimator.estimate(&RunPlan {
            prompt_tokens: 1,
            max_new_tokens: 0,
            image_pixels: Vec::new(),
            vision_tokens: 0,
            ..plan.clone()
        });
        let decode_workspace = self.estimator.run_parts(&decode).get(MemoryKind::Workspace);
        RunEstimate {
            estimate,
            parts,
            decode_workspace,
        }
    }

    /// The memory a text run on `model` is predicted to take: `prompt_tokens`, then up
    /// to `max_tokens` generated, with a KV cache of at most `kv_budget_tokens` tokens
    /// when pruned.
    pub fn estimate_text(
        &self,
        model: &Model,
        prompt_tokens: usize,
        max_tokens: usize,
        kv_budget_tokens: Option<usize>,
    ) -> RunEstimate {
        let held = model.cache_tokens(prompt_tokens + max_tokens, kv_budget_tokens);
        // The KV term counts the tokens the cache holds; the attention scores count
        // every position, which `prompt_tokens + max_tokens` gives.
        let plan = RunPlan {
            weights: Weights::Bytes(model.weight_bytes()),
            shape: model_shape(model.config()),
            prompt_tokens: prompt_tokens as u64,
            max_new_tokens: max_tokens as u64,
            batch: 1,
            kv_bytes_per_token: model.kv_bytes_per_token(),
            prefill_chunk: afo_engine::PREFILL_CHUNK as u64,
            image_pixels: Vec::new(),
            vision_tokens: 0,
            output: RunOutput::Logits,
            // A pruned plan keeps sinks and a window, which read no attention weights.
            attention: model.attention_memory(PrunePolicy::None),
        };
        let mut e = self.estimate_plan(&plan);
        let full = (prompt_tokens + max_tokens) as u64 * model.kv_bytes_per_token();
        let kv = held as u64 * model.kv_bytes_per_token();
        if kv < full {
            let with_slack = |b: u64| b + (b as f64 * self.estimator.overhead_fraction) as u64;
            e.estimate.total -= e.estimate.kv_cache - kv;
            e.estimate.kv_cache = kv;
            let parts = e.parts;
            e.parts = KindBytes::of(MemoryKind::KvCache, with_slack(kv))
                .with(MemoryKind::Workspace, parts.get(MemoryKind::Workspace))
                .with(MemoryKind::Images, parts.get(MemoryKind::Images));
        }
        // With prefix reuse on, the prompt's blocks are copied into the prefix cache
        // after its prefill: workspace until they are settled as the cache's own.
        if self.prefix.budget_bytes > 0 {
            let blocks =
                (prompt_tokens as u64 * model.kv_bytes_per_token()).min(self.prefix.budget_bytes);
            e.parts = e.parts.with(MemoryKind::Workspace, blocks);
        }
        e
    }

    /// The memory a vision-language request is predicted to take: the preprocessed
    /// images (`image_pixels` per image) and the vision encoder's states
    /// (`vision_tokens` patches in all), then a text run of `prompt_tokens` and up to
    /// `max_tokens` on the VLM's language model.
    pub fn estimate_vision(
        &self,
        vlm: &afo_engine::VisionLanguageModel,
        prompt_tokens: usize,
        max_tokens: usize,
        image_pixels: Vec<u64>,
        vision_tokens: usize,
    ) -> RunEstimate {
        let text = vlm.text_model();
        self.estimate_plan(&RunPlan {
            weights: Weights::Bytes(vlm.weight_bytes()),
            shape: model_shape(text.config()),
            prompt_tokens: prompt_tokens as u64,
            max_new_tokens: max_tokens as u64,
            batch: 1,
            kv_bytes_per_token: text.kv_bytes_per_token(),
            prefill_chunk: afo_engine::PREFILL_CHUNK as u64,
            image_pixels,
            vision_tokens: vision_tokens as u64,
            output: RunOutput::Logits,
            attention: text.attention_memory(PrunePolicy::None),
        })
    }

    /// The memory an embedding run on `model` is predicted to take: its inputs run
    /// one at a time, each through a KV cache of its own tokens only (nothing is
    /// generated), the longest `longest_tokens`; no logits; `vectors` pooled vectors
    /// returned.
    pub fn estimate_embeddings(
        &self,
        model: &Model,
        longest_tokens: usize,
        vectors: usize,
    ) -> RunEstimate {
        self.estimate_plan(&RunPlan {
            weights: Weights::Bytes(model.weight_bytes()),
            shape: model_shape(model.config()),
            prompt_tokens: longest_tokens as u64,
            max_new_tokens: 0,
            batch: 1,
            kv_bytes_per_token: model.kv_bytes_per_token(),
            prefill_chunk: afo_engine::PREFILL_CHUNK as u64,
            image_pixels: Vec::new(),
            vision_tokens: 0,
            output: RunOutput::Embeddings {
                vectors: vectors as u64,
            },
            attention: model.attention_memory(PrunePolicy::None),
        })
    }

    /// The plans for a text run, the one asked for first, then cheaper ones: a KV
    /// budget with attention sinks, then a smaller `max_tokens` that fits what the
    /// ledger has left.
    pub(crate) fn text_plans(
        &self,
        model: &Model,
        prompt_tokens: usize,
        max_tokens: usize,
        kv: Option<(usize, PrunePolicy)>,
    ) -> Vec<TextPlan> {
        let mut plans = vec![TextPlan {
            name: "as asked".to_owned(),
            max_tokens,
            kv_budget: kv,
            estimate: self.estimate_text(model, prompt_tokens, max_tokens, kv.map(|k| k.0)),
        }];
        let total = prompt_tokens + max_tokens;
        let budget = (total / 2).max(MIN_KV_BUDGET).next_multiple_of(64);
        if kv.is_none() && budget < total {
            let policy = PrunePolicy::Sinks {
                sink_tokens: SINK_TOKENS,
                window: budget - SINK_TOKENS - 64,
            };
            plans.push(TextPlan {
                name: format!("kv_budget={budget}+sinks"),
                max_tokens,
                kv_budget: Some((budget, policy)),
                estimate: self.estimate_text(model, prompt_tokens, max_tokens, Some(budget)),
            });
        }
        // The token budget's KV headroom: as many new tokens as what is left allows.
        let available = self.ledger.snapshot().available();
        let per_token = model.kv_bytes_per_token().max(1);
        let one = self.estimate_text(model, prompt_tokens, 1, kv.map(|k| k.0));
        let spare = available.saturating_sub(one.run_bytes()) / per_token;
        let fitting = (1 + spare as usize * 9 / 10).min(max_tokens);
        let mut smaller = vec![fitting, max_tokens / 4, 16];
        smaller.sort_unstable_by(|a, b| b.cmp(a));
        for m in smaller {
            if m >= 1 && m < max_tokens && !plans.iter().any(|p| p.max_tokens == m) {
                plans.push(TextPlan {
                    name: format!("max_tokens={m}"),
                    max_tokens: m,
                    kv_budget: kv,
                    estimate: self.estimate_text(model, prompt_tokens, m, kv.map(|k| k.0)),
                });
            }
        }
        plans
    }

    /// Admits a text run on `model`: its plans ([`Runtime::text_plans`]) through
    /// [`Runtime::admit`]; returns the plan that runs and its admission.
    ///
    /// # Errors
    /// [`crate::Error::Refused`] with the numbers and the plans tried.
    pub(crate) fn admit_text(
        &self,
        model: &Model,
        prompt_tokens: usize,
        max_tokens: usize,
        kv: Option<(usize, PrunePolicy)>,
    ) -> Result<(TextPlan, Admitted)> {
        let mut plans = self.text_plans(model, prompt_tokens, max_tokens, kv);
        let options: Vec<PlanOption> = plans
            .iter()
            .map(|p| PlanOption::new(p.name.clone(), p.estimate.parts))
            .collect();
        let admitted = self
            .admit(&options)
            .map_err(|(refusal, tried)| crate::Error::Refused { refusal, tried })?;
        let plan = plans.swap_remove(admitted.index);
        Ok((plan, admitted))
    }

    /// Admits a run: reserves the first of `plans` (name and bytes; the one asked
    /// for first) that fits under the cutline less the margin. When none fits, room
    /// is made and the plans are tried again: prefix-cache blocks are dropped, idle
    /// models are evicted least recently used first (never one in use or pinned), and
    /// the allocator's free memory goes back to the system.
    ///
    /// # Errors
    /// The ledger's [`Refusal`] for the first plan, with the names of all plans tried.
    pub fn admit(
        &self,
        plans: &[PlanOption],
    ) -> std::result::Result<Admitted, (Refusal, Vec<String>)> {
        let tried: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
        let mut trimmed = false;
        loop {
            self.observe_memory();
            let snapshot = self.ledger.snapshot();
            match self.ledger.admit(plans) {
                Admission::Admit {
                    index,
                    predicted_peak,
                    reservation,
                } => {
                    let decision = if index == 0 { "admitted" } else { "degraded" };
                    let record = AdmissionRecord {
                        decision: decision.to_owned(),
                        plan: tried.get(index).cloned().unwrap_or_default(),
                        tried: tried[..=index.min(tried.len().saturating_sub(1))].to_vec(),
                        reserved_bytes: snapshot.reserved_total(),
                        run_bytes: reservation.bytes(),
                        unaccounted_bytes: snapshot.unaccounted,
                    };
                    if index > 0 {
                        tracing::info!(plan = %record.plan, "degraded: the plan asked for does not fit");
                    }
                    return Ok(Admitted {
                        reservation,
                        index,
                        predicted_peak_bytes: predicted_peak,
                        record,
                    });
                }
                Admission::Refuse(refusal) => {
                    if self.make_room() {
                        continue;
                    }
                    if !trimmed {
                        trimmed = true;
                        afo_guard::release_free_memory();
                        continue;
                    }
                    return Err((refusal, tried));
                }
            }
        }
    }

    /// Frees one thing the ledger holds that no run needs: a prefix cache's blocks,
    /// else the least recently used idle model. Returns whether anything was freed.
    pub(crate) fn make_room(&self) -> bool {
        if self.clear_prefix_caches() {
            return true;
        }
        let text = self.cache.oldest_idle();
        let vision = self.vlm_cache.oldest_idle();
        let evicted = match (text, vision) {
            (Some(t), Some(v)) if v < t => self.vlm_cache.evict_lru_idle(),
            (Some(_), _) => self.cache.evict_lru_idle(),
            (None, Some(_)) => self.vlm_cache.evict_lru_idle(),
            (None, None) => None,
        };
        if let Some((key, bytes)) = &evicted {
            self.forget_prefix_cache(key);
            tracing::info!(model = %key, bytes, "evicted an idle model to make room");
        }
        evicted.is_some()
    }

    /// Bytes reserved by the loaded models (text and vision) that `which` selects.
    pub(crate) fn loaded_bytes(&self, which: impl Fn(&afo_engine::LoadedEntry) -> bool) -> u64 {
        self.cache
            .loaded()
            .iter()
            .chain(self.vlm_cache.loaded().iter())
            .filter(|e| which(e))
            .map(|e| e.bytes)
            .sum()
    }

    /// Samples the resident memory and tells the ledger; returns it.
    pub(crate) fn observe_memory(&self) -> u64 {
        let rss = afo_guard::process_rss().map_or(0, |(rss, _)| rss);
        self.ledger.observe_rss(rss);
        rss
    }

    /// Checks whether a run on `model` (loaded as `scheme`) reserving `run_bytes`
    /// could ever be admitted: beside the runtime itself, the model's weights and the
    /// pinned models, with every other model evicted, every prefix block dropped and
    /// every run in flight ended. A request that fails this can never run; one that
    /// passes may still wait for room.
    ///
    /// # Errors
    /// The [`Refusal`] when it could not.
    pub fn check_admissible(
        &self,
        model: &std::path::Path,
        scheme: Option<afo_quant::QuantScheme>,
        run_bytes: u64,
    ) -> std::result::Result<(), Refusal> {
        let key = crate::runtime::cache_key(model, scheme);
        let s = self.ledger.snapshot();
        let kept = self.loaded_bytes(|e| e.pinned || e.key == key);
        let staying = s.reserved.get(MemoryKind::Runtime).saturating_add(kept);
        let limit = s.cutline.saturating_sub(s.min_margin);
        if staying.saturating_add(run_bytes) > limit {
            return Err(Refusal {
                needed: run_bytes,
                reserved: staying,
                margin: s.min_margin,
                unaccounted: s.unaccounted,
                cutline: s.cutline,
            });
        }
        Ok(())
    }

    /// Writes a run's SSOT v2 record (when the runtime has a log) and returns it:
    /// the badge and health score of its peak, its admission, the unaccounted memory
    /// now. Refused and failed runs are recorded too (`error` set).
    ///
    /// # Errors
    /// An invalid record or a failed write ([`crate::Error::Ssot`]).
    pub fn record(&self, report: &RunReport) -> Result<Record> {
        let budget = self.budget();
        let failed = report.error.is_some();
        let fallback = report
            .selection
            .as_ref()
            .is_some_and(|s| s.fallback_from.is_some())
            || report
                .admission
                .as_ref()
                .is_some_and(|a| a.decision == "degraded");
        let base = RecordV1 {
            schema_version: 2,
            ts: Timestamp::now(),
            run_id: report.run_id.clone(),
            chain: report.chain.clone(),
            model_id: report.model_id.clone(),
            status: if failed {
                RunStatus::Error
            } else {
                RunStatus::Ok
            },
            error: report.error.clone(),
            latency_ms: report.latency_ms,
            peak_memory_bytes: report.peak_memory_bytes,
            cutline_bytes: budget.cutline(),
            tokens_in: report.tokens_in,
            tokens_out: report.tokens_out,
            tokens_per_s: report.tokens_per_s.unwrap_or(0.0),
        };
        let mut r = RecordV2::new(base);
        r.status_badge = Some(badge(report.peak_memory_bytes, budget));
        r.health_score = Some(health_score(HealthInputs {
            peak_bytes: report.peak_memory_bytes,
            cutline_bytes: budget.cutline(),
            error: failed,
            fallback,
        }));
        r.lazy_cache_hit_rate = self.cache.stats().hit_rate();
        r.load_ms = report.load_ms;
        r.reload_overhead_ms = report.reload_overhead_ms;
        r.token_budget = report.token_budget;
        r.kv_cache_size = report.kv_cache_bytes;
        r.kv_evicted_tokens = report.kv_evicted_tokens;
        r.prefix_cache_hit_tokens = report.prefix_cache_hit_tokens;
        r.predicted_peak_bytes = report.predicted_peak_bytes;
        r.ttft_ms = report.ttft_ms;
        r.selection = Some(report.selection.clone().unwrap_or_else(|| Selection {
            model_id: report.model_id.clone(),
            reason: "explicit".to_owned(),
            fallback_from: None,
            trinity_score: None,
        }));
        r.image_pixels = report.image_pixels;
        r.original_pixels = report.original_pixels;
        r.compression_ratio = report.compression_ratio;
        r.stages = report.stages.clone();
        r.admission = report.admission.clone();
        r.unaccounted_bytes = Some(self.ledger.snapshot().unaccounted);
        r.replica_id = self.replica_id.clone();
        r.node_id = self.node_id.clone();
        let record = Record::from(r);
        if let Some(log) = &self.log {
            log.append(&record)?;
        }
        Ok(record)
    }
}

/// What a run did and cost, for [`Runtime::record`]. [`RunReport::new`] sets every
/// optional figure to unknown.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunReport {
    /// The run's id.
    pub run_id: String,
    /// `generate`, `image_summary` or `embeddings`.
    pub chain: String,
    /// The model's id.
    pub model_id: String,
    /// Why it failed or was refused; `None` for a run that completed.
    pub error: Option<String>,
    /// Wall time, in milliseconds.
    pub latency_ms: f64,
    /// The measured peak resident memory, in bytes.
    pub peak_memory_bytes: u64,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Generated tokens.
    pub tokens_out: u64,
    /// Decode speed.
    pub tokens_per_s: Option<f64>,
    /// Time to the first token, in milliseconds.
    pub ttft_ms: Option<f64>,
    /// The peak predicted at admission.
    pub predicted_peak_bytes: Option<u64>,
    /// The `max_tokens` the run was given.
    pub token_budget: Option<u64>,
    /// Bytes of the run's KV cache.
    pub kv_cache_bytes: Option<u64>,
    /// Tokens pruned from the KV cache.
    pub kv_evicted_tokens: Option<u64>,
    /// Prompt tokens reused from the prefix cache.
    pub prefix_cache_hit_tokens: Option<u64>,
    /// Model load time, on a cache miss, in milliseconds.
    pub load_ms: Option<f64>,
    /// Re-acquire time, on a cache hit, in milliseconds.
    pub reload_overhead_ms: Option<f64>,
    /// How the model was chosen (`None`: given explicitly).
    pub selection: Option<Selection>,
    /// How the ledger decided on the run.
    pub admission: Option<AdmissionRecord>,
    /// Pixels fed to the vision encoder.
    pub image_pixels: Option<u64>,
    /// Pixels of the input images.
    pub original_pixels: Option<u64>,
    /// Input bytes over re-encoded bytes.
    pub compression_ratio: Option<f64>,
    /// A chain's stages.
    pub stages: Option<Vec<Stage>>,
}

impl RunReport {
    /// A report of run `run_id` of `chain` on `model_id`, every figure unknown.
    pub fn new(
        run_id: impl Into<String>,
        chain: impl Into<String>,
        model_id: impl Into<String>,
    ) -> Self {
        Self {
            run_id: run_id.into(),
            chain: chain.into(),
            model_id: model_id.into(),
            error: None,
            latency_ms: 0.0,
            peak_memory_bytes: 0,
            tokens_in: 0,
            tokens_out: 0,
            tokens_per_s: None,
            ttft_ms: None,
            predicted_peak_bytes: None,
            token_budget: None,
            kv_cache_bytes: None,
            kv_evicted_tokens: None,
            prefix_cache_hit_tokens: None,
            load_ms: None,
            reload_overhead_ms: None,
            selection: None,
            admission: None,
            image_pixels: None,
            original_pixels: None,
            compression_ratio: None,
            stages: None,
        }
    }

    /// The admission record of a refused run.
    pub fn refused(refusal: &Refusal, tried: &[String]) -> AdmissionRecord {
        AdmissionRecord {
            decision: "refused".to_owned(),
            plan: tried
                .first()
                .cloned()
                .unwrap_or_else(|| "as asked".to_owned()),
            tried: tried.to_vec(),
            reserved_bytes: refusal.reserved,
            run_bytes: 0,
            unaccounted_bytes: refusal.unaccounted,
        }
    }
}
