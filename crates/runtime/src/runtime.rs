//! The `Runtime`: the memory guard, the model cache, the engine and the SSOT log,
//! wired together for one call.
//!
//! Each loaded model has a prefix cache ([`afo_kvcache::PrefixCache`]): a prompt that
//! starts like an earlier one (a system prompt, a chat history) reuses that prompt's
//! keys and values and runs only the rest. The caches' limits come from
//! [`RuntimeBuilder::prefix_cache`]; a model's cache is dropped with the model.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afo_engine::{
    ChatOptions, ChatOutput, ChatOutputParser, Constraint, FinishReason, GenerateOptions,
    GenerateTimings, LoadedModel, Message, ModelCache, PrefixReuse, ToolChoice, ToolDefinition,
    generate_with_prefix, tool_call_grammar,
};
use afo_guard::{
    ByteSize, Estimator, HealthInputs, Ledger, LedgerSnapshot, MemoryBudget, MemoryKind,
    PeakTracker, Probe, Reservation, StatusBadge, SystemProbe, badge, health_score,
};
use afo_kvcache::{PrefixCache, PrefixCacheConfig, PrefixCacheStats, Salt};
use afo_quant::{QuantPolicy, QuantScheme};
use afo_select::{Catalog, PolicyRouter, Router};
use afo_ssot::{Durability, JsonlWriter, Selection, Timestamp};

use crate::error::Result;
use crate::run::RunReport;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, continued as it is.
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
}

/// One generation request. [`GenerateRequest::new`] sets the defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerateRequest {
    /// The model: a GGUF file or a Hugging Face model directory.
    pub model: PathBuf,
    /// Quantize the attention and MLP weights to this scheme while loading (by
    /// [`QuantPolicy::new`]); `None` runs the weights as stored.
    pub scheme: Option<QuantScheme>,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling, stops and the token budget (and a [`Constraint`] on the output, a
    /// reasoning budget, log-probabilities).
    pub options: GenerateOptions,
    /// For a [`Prompt::Chat`]: the tools offered and thinking, handed to the model's
    /// chat template. Default none.
    pub chat: ChatOptions,
    /// For a [`Prompt::Chat`] with tools: [`ToolChoice::Required`] or a function
    /// constrains the output to calls in the model's tool-call format (unless the
    /// options carry a constraint of their own); [`ToolChoice::Auto`] (the default)
    /// leaves it free. The calls come back in [`GenerateResponse::output`].
    pub tool_choice: ToolChoice,
}

impl GenerateRequest {
    /// A request to run `prompt` on `model` (a GGUF file or a model directory) as
    /// stored, with [`GenerateOptions::default`].
    pub fn new(model: impl Into<PathBuf>, prompt: Prompt) -> Self {
        Self {
            model: model.into(),
            scheme: None,
            prompt,
            options: GenerateOptions::default(),
            chat: ChatOptions::default(),
            tool_choice: ToolChoice::Auto,
        }
    }

    /// The same request offering `tools` to the model, with `choice`.
    pub fn with_tools(mut self, tools: Vec<ToolDefinition>, choice: ToolChoice) -> Self {
        self.chat.tools = tools;
        self.tool_choice = choice;
        self
    }

    /// The same request asking the chat template to think, or not.
    pub fn with_thinking(mut self, enable: bool) -> Self {
        self.chat.enable_thinking = Some(enable);
        self
    }

    /// The same request with these options.
    pub fn with_options(mut self, options: GenerateOptions) -> Self {
        self.options = options;
        self
    }

    /// The same request, quantizing the weights to `scheme` while loading.
    pub fn with_scheme(mut self, scheme: QuantScheme) -> Self {
        self.scheme = Some(scheme);
        self
    }
}

/// What a generation produced and cost.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerateResponse {
    /// The run's id (also in the SSOT record).
    pub run_id: String,
    /// The model's id.
    pub model_id: String,
    /// The generated text.
    pub text: String,
    /// For a [`Prompt::Chat`]: the text read as the model's reasoning (a `<think>`
    /// block), its answer, and the tool calls it made (when tools were offered).
    pub output: Option<ChatOutput>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Timings of the generation.
    pub timings: GenerateTimings,
    /// Generated tokens per second of decoding.
    pub tokens_per_s: Option<f64>,
    /// Whether the model was already loaded.
    pub cache_hit: bool,
    /// Cold load time (misses) or re-acquire time (hits), in milliseconds.
    pub acquire_ms: f64,
    /// The peak predicted before the run, in bytes.
    pub predicted_peak_bytes: u64,
    /// The measured peak resident memory, in bytes.
    pub peak_memory_bytes: u64,
    /// The cutline in force, in bytes.
    pub cutline_bytes: u64,
    /// The badge of the measured peak.
    pub badge: StatusBadge,
    /// The health score, 0-100.
    pub health_score: f64,
    /// Wall time of the whole call, in milliseconds.
    pub latency_ms: f64,
    /// The `max_tokens` the run was given.
    pub token_budget: usize,
    /// Bytes held by the run's KV cache at its end.
    pub kv_cache_bytes: u64,
    /// Tokens the KV cache pruned during the run.
    pub kv_evicted_tokens: u64,
    /// Prompt tokens whose keys and values came from the model's prefix cache (their
    /// prefill was skipped).
    pub prefix_cache_hit_tokens: u64,
    /// How the model was chosen (written to the SSOT record's `selection`); `None`
    /// for an explicit model.
    pub selection: Option<Selection>,
    /// How the ledger admitted the run: the plan that ran (the one asked for, or a
    /// cheaper one) and the plans tried.
    pub admission: afo_ssot::AdmissionRecord,
}

/// The cache key of a model file loaded in a scheme.
pub(crate) fn cache_key(model: &Path, scheme: Option<QuantScheme>) -> String {
    let path = model
        .canonicalize()
        .unwrap_or_else(|_| model.to_path_buf())
        .display()
        .to_string();
    match scheme {
        None => path,
        Some(s) => format!("{path}#{s}"),
    }
}

/// Time from `start` to the first token: the generation measured it from its own
/// start, which came after the model was acquired and the prompt encoded.
fn first_token_ms(start: Instant, timings: &GenerateTimings) -> Option<f64> {
    let generation_ms = timings.total_ms;
    let elapsed_before = start.elapsed().as_secs_f64() * 1e3 - generation_ms;
    timings.ttft_ms.map(|t| t + elapsed_before.max(0.0))
}

/// The process's health, as `/health` and the dashboard show it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// Badge of the current resident memory against the cutline.
    pub badge: StatusBadge,
    /// Health score of the current resident memory.
    pub health_score: f64,
    /// Resident memory now, in bytes.
    pub rss_bytes: u64,
    /// The cutline in force, in bytes.
    pub cutline_bytes: u64,
    /// The ledger now: reserved bytes by kind, the margin, the unaccounted memory
    /// (resident less reserved), runs in flight.
    pub ledger: LedgerSnapshot,
    /// Models loaded (text and vision-language).
    pub loaded_models: Vec<LoadedModelInfo>,
    /// Lazy model cache hit rate so far.
    pub cache_hit_rate: Option<f64>,
}

/// A loaded model, as [`Health`] lists it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LoadedModelInfo {
    /// The model's cache key (its canonical path, `#scheme` when quantized on load).
    pub key: String,
    /// Bytes reserved for its weights.
    pub bytes: u64,
    /// Whether a run or a server worker holds it now.
    pub in_use: bool,
    /// Whether it is pinned (never evicted).
    pub pinned: bool,
}

/// What [`Runtime::preload`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Preloaded {
    /// Whether the model was loaded already.
    pub hit: bool,
    /// The load time on a miss, the re-acquire time on a hit, in milliseconds.
    pub acquire_ms: f64,
}

/// A model's prefix cache and its blocks' bytes in the ledger.
#[derive(Debug)]
pub(crate) struct PrefixSlot {
    pub cache: Arc<PrefixCache>,
    pub reservation: Reservation,
}

/// Builds a [`Runtime`].
#[derive(Clone, Default)]
pub struct RuntimeBuilder {
    cutline: Option<ByteSize>,
    warn_fraction: Option<f64>,
    log_path: Option<PathBuf>,
    durability: Durability,
    keep_alive: Option<Duration>,
    catalog: Option<Catalog>,
    router: Option<std::sync::Arc<dyn Router + Send + Sync>>,
    kv: Option<(usize, afo_kvcache::PrunePolicy)>,
    kv_format: afo_kvcache::KvFormat,
    prefix: Option<PrefixCacheConfig>,
    replica_id: Option<String>,
    node_id: Option<String>,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("cutline", &self.cutline)
            .field("warn_fraction", &self.warn_fraction)
            .field("log_path", &self.log_path)
            .field("keep_alive", &self.keep_alive)
            .field("catalog", &self.catalog.as_ref().map(Catalog::len))
            .field("replica_id", &self.replica_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// The memory cutline. Default 20 GiB, lowered to the cgroup limit less a reserve
    /// when the process runs in a container with a lower limit.
    pub fn cutline(mut self, cutline: ByteSize) -> Self {
        self.cutline = Some(cutline);
        self
    }

    /// The warn fraction of the cutline. Default 0.9.
    pub fn warn_fraction(mut self, fraction: f64) -> Self {
        self.warn_fraction = Some(fraction);
        self
    }

    /// Append one SSOT v2 record per run to this JSONL log. Default: no log.
    pub fn ssot_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_path = Some(path.into());
        self
    }

    /// The log's durability. Default [`Durability::OsBuffered`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The model catalog [`Runtime::query`] routes over. Default: none.
    pub fn catalog(mut self, catalog: Catalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// The router [`Runtime::query`] uses. Default: [`PolicyRouter::default`].
    pub fn router(mut self, router: impl Router + Send + Sync + 'static) -> Self {
        self.router = Some(std::sync::Arc::new(router));
        self
    }

    /// Limit each run's KV cache to `budget` tokens, pruned by `policy` (see
    /// [`afo_kvcache`]). Default: a full cache for the prompt and `max_tokens`.
    pub fn kv_budget(mut self, budget: usize, policy: afo_kvcache::PrunePolicy) -> Self {
        self.kv = Some((budget, policy));
        self
    }

    /// How every model's KV caches hold keys and values: f32, f16 (the default), bf16
    /// or Q8_0 blocks (26.6% of f32's bytes; see [`afo_kvcache::KvFormat`]). Every
    /// memory estimate and ledger reservation of a run counts the format's bytes. A
    /// model whose heads the format cannot hold fails to load with the reason.
    pub fn kv_format(mut self, format: afo_kvcache::KvFormat) -> Self {
        self.kv_format = format;
        self
    }

    /// The limits of each loaded model's prefix cache: block size, byte budget, and
    /// the time-to-live of unused blocks. Default: [`PrefixCacheConfig::default`]
    /// (blocks of 16 tokens, 10 minutes) with a budget of an eighth of the cutline,
    /// at most 256 MiB per model. A budget of 0 turns prefix reuse off. The blocks'
    /// bytes are reserved in the ledger, and dropped when a run or a load needs them.
    pub fn prefix_cache(mut self, config: PrefixCacheConfig) -> Self {
        self.prefix = Some(config);
        self
    }

    /// The replica of a deployment this runtime is (a Ray Serve replica, a Kubernetes
    /// pod), written as `replica_id` in every SSOT record, so that the logs of several
    /// replicas can be told apart once merged. Default: none (the field is left out).
    pub fn replica_id(mut self, id: impl Into<String>) -> Self {
        self.replica_id = Some(id.into());
        self
    }

    /// The node (machine) this runtime runs on, written as `node_id` in every SSOT
    /// record. Default: none (the field is left out).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// Drop idle models after this long. Default: keep them.
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = Some(keep_alive);
        self
    }

    /// Builds the runtime: checks the budget, reads the cgroup limit, opens the log,
    /// and fixes the allocator's thresholds so that large freed blocks return to the
    /// system ([`afo_guard::return_large_blocks`], process-wide). Each model loaded
    /// then lets the allocator keep one prefill chunk's activations between
    /// operations ([`afo_guard::reuse_workspace`]).
    ///
    /// # Errors
    /// An invalid budget or prefix cache block size, an unreadable cgroup file, a log
    /// that cannot be opened.
    pub fn build(self) -> Result<Runtime> {
        let mut budget = MemoryBudget::builder();
        if let Some(c) = self.cutline {
            budget = budget.cutline(c);
        }
        if let Some(w) = self.warn_fraction {
            budget = budget.warn_fraction(w);
        }
        let budget = budget.build()?;
        let probe = SystemProbe::new();
        let snapshot = probe.snapshot()?;
        let budget = budget.with_cutline(budget.effective_cutline(snapshot.cgroup_limit()));
        let prefix = self.prefix.unwrap_or_else(|| PrefixCacheConfig {
            budget_bytes: (budget.cutline() / 8).min(256 << 20),
            ..PrefixCacheConfig::default()
        });
        // Checks the configuration once (the per-model caches are made on first use).
        PrefixCache::new(prefix).map_err(afo_engine::Error::from)?;
        let log = self
            .log_path
            .map(|p| JsonlWriter::open(p, self.durability))
            .transpose()?;
        // Freed activations and KV caches go back to the system, so that the resident
        // memory follows the ledger down after a burst (see
        // `afo_guard::return_large_blocks`).
        afo_guard::return_large_blocks();
        let ledger = Ledger::new(budget.cutline());
        // The process as it stands (code, allocator, the embedding program) is the
        // runtime's own share of the ledger.
        let base = ledger.reserve_existing(MemoryKind::Runtime, snapshot.rss_bytes);
        ledger.observe_rss(snapshot.rss_bytes);
        Ok(Runtime {
            budget,
            cache: ModelCache::new(ledger.clone(), self.keep_alive),
            vlm_cache: ModelCache::new(ledger.clone(), self.keep_alive),
            ledger,
            _base: base,
            log,
            probe,
            estimator: Estimator::default(),
            runs: AtomicU64::new(0),
            catalog: self.catalog,
            kv: self.kv,
            kv_format: self.kv_format,
            prefix,
            prefix_caches: Mutex::default(),
            stored_schemes: Default::default(),
            router: self
                .router
                .unwrap_or_else(|| std::sync::Arc::new(PolicyRouter::default())),
            replica_id: self.replica_id,
            node_id: self.node_id,
        })
    }
}

/// The runtime other programs embed. See the crate docs.
pub struct Runtime {
    budget: MemoryBudget,
    /// The one account of the process's memory.
    pub(crate) ledger: Ledger,
    /// The runtime's own memory at start-up.
    _base: Reservation,
    pub(crate) cache: ModelCache<LoadedModel>,
    /// Vision-language models, cached apart from text models (their own type).
    pub(crate) vlm_cache: ModelCache<afo_engine::VisionLanguageModel>,
    pub(crate) log: Option<JsonlWriter>,
    pub(crate) probe: SystemProbe,
    pub(crate) estimator: Estimator,
    runs: AtomicU64,
    pub(crate) catalog: Option<Catalog>,
    pub(crate) router: std::sync::Arc<dyn Router + Send + Sync>,
    kv: Option<(usize, afo_kvcache::PrunePolicy)>,
    /// How loaded models' KV caches hold keys and values.
    pub(crate) kv_format: afo_kvcache::KvFormat,
    pub(crate) prefix: PrefixCacheConfig,
    /// Each loaded model's prefix cache, by model cache key.
    prefix_caches: Mutex<HashMap<String, PrefixSlot>>,
    /// The scheme each model file's layers are stored in, read once per file.
    stored_schemes: std::sync::Mutex<std::collections::HashMap<PathBuf, Option<QuantScheme>>>,
    /// Written in every record: which replica of a deployment this is.
    pub(crate) replica_id: Option<String>,
    /// Written in every record: the node the replica runs on.
    pub(crate) node_id: Option<String>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("budget", &self.budget)
            .field("cache", &self.cache)
            .field("catalog", &self.catalog.as_ref().map(Catalog::len))
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A builder with the defaults.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// The replica id written in every record, when one was given
    /// ([`RuntimeBuilder::replica_id`]).
    pub fn replica_id(&self) -> Option<&str> {
        self.replica_id.as_deref()
    }

    /// The node id written in every record, when one was given
    /// ([`RuntimeBuilder::node_id`]).
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// The memory budget in force (cutline already lowered to a cgroup limit).
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Loads a model into the cache (or finds it there).
    ///
    /// # Errors
    /// Loading errors, or a model that does not fit under the cutline even with
    /// every idle model evicted.
    pub fn preload(&self, model: &Path) -> Result<Preloaded> {
        let acquired = self.acquire(model, None, None)?;
        Ok(Preloaded {
            hit: acquired.hit,
            acquire_ms: acquired.acquire_ms,
        })
    }

    /// Keeps `model` (loaded as `scheme`) loaded once it is: never evicted to make
    /// room, never dropped by the keep-alive.
    pub fn pin(&self, model: &Path, scheme: Option<QuantScheme>) {
        let key = cache_key(model, scheme);
        self.cache.pin(&key);
        self.vlm_cache.pin(&key);
    }

    /// Drops every idle model (neither in use nor pinned) and every prefix-cache
    /// block, and gives the freed memory back to the system; returns how many models
    /// went.
    pub fn evict_idle(&self) -> usize {
        self.clear_prefix_caches();
        let mut n = 0;
        while let Some((key, _)) = self
            .cache
            .evict_lru_idle()
            .or_else(|| self.vlm_cache.evict_lru_idle())
        {
            self.forget_prefix_cache(&key);
            n += 1;
        }
        afo_guard::release_free_memory();
        n
    }

    /// The ledger and the resident memory now (the resident memory is sampled, and
    /// the ledger told of it).
    pub fn memory(&self) -> LedgerSnapshot {
        self.observe_memory();
        self.ledger.snapshot()
    }

    /// The scheme `model`'s layers are stored in (`blk.0.attn_q.weight` of a GGUF
    /// file; `None` for anything else), parsed once per file and remembered: the
    /// header of a GGUF holds the whole vocabulary, too much to read per request.
    pub(crate) fn stored_scheme(&self, model: &Path) -> Option<QuantScheme> {
        let mut known = self
            .stored_schemes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *known.entry(model.to_path_buf()).or_insert_with(|| {
            afo_engine::GgufFile::open(model).ok().and_then(|f| {
                f.content()
                    .tensor_infos
                    .get("blk.0.attn_q.weight")
                    .map(|i| QuantScheme::from_ggml(i.ggml_dtype))
            })
        })
    }

    /// The prefix cache of `model` loaded in `scheme`, and the salt of its blocks, for
    /// a caller that prefills itself (a batching scheduler:
    /// [`afo_engine::Scheduler::set_prefix_cache`]). `None` when prefix reuse is off.
    /// Caches of models no longer loaded are dropped on the way. Its blocks' bytes
    /// are settled in the ledger by [`Runtime::settle_prefix_cache`].
    pub fn prefix_cache(
        &self,
        model: &Path,
        scheme: Option<QuantScheme>,
    ) -> Option<(Arc<PrefixCache>, Salt)> {
        if self.prefix.budget_bytes == 0 {
            return None;
        }
        let key = cache_key(model, scheme);
        let mut loaded: Vec<String> = self.cache.loaded().into_iter().map(|e| e.key).collect();
        loaded.extend(self.vlm_cache.loaded().into_iter().map(|e| e.key));
        let mut caches = self.prefix_caches.lock().unwrap_or_else(|e| e.into_inner());
        caches.retain(|k, _| *k == key || loaded.contains(k));
        let cache = match caches.get(&key) {
            Some(c) => Arc::clone(&c.cache),
            None => {
                let c = Arc::new(PrefixCache::new(self.prefix).ok()?);
                let reservation = self.ledger.reserve_existing(MemoryKind::PrefixCache, 0);
                caches.insert(
                    key.clone(),
                    PrefixSlot {
                        cache: Arc::clone(&c),
                        reservation,
                    },
                );
                c
            }
        };
        Some((cache, Salt::new(key.as_bytes())))
    }

    /// Brings the ledger's figure for every prefix cache to the bytes its blocks hold
    /// now (after a run published its prompt's blocks, or blocks expired).
    pub fn settle_prefix_cache(&self) {
        let mut caches = self.prefix_caches.lock().unwrap_or_else(|e| e.into_inner());
        for slot in caches.values_mut() {
            let bytes = slot.cache.bytes();
            slot.reservation.settle(MemoryKind::PrefixCache, bytes);
        }
    }

    /// Drops every prefix cache's blocks; returns whether any bytes were held.
    pub(crate) fn clear_prefix_caches(&self) -> bool {
        let mut caches = self.prefix_caches.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = false;
        for slot in caches.values_mut() {
            if slot.reservation.bytes() > 0 || slot.cache.bytes() > 0 {
                freed |= slot.reservation.bytes() > 0;
                slot.cache.clear();
                slot.reservation
                    .settle(MemoryKind::PrefixCache, slot.cache.bytes());
            }
        }
        freed
    }

    /// Drops the prefix cache of an evicted model.
    pub(crate) fn forget_prefix_cache(&self, key: &str) {
        let mut caches = self.prefix_caches.lock().unwrap_or_else(|e| e.into_inner());
        caches.remove(key);
    }

    /// Each model's prefix cache counters and holdings, by model cache key.
    pub fn prefix_cache_stats(&self) -> Vec<(String, PrefixCacheStats)> {
        let caches = self.prefix_caches.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = caches
            .iter()
            .map(|(k, c)| (k.clone(), c.cache.stats()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Whether a model is in the cache already.
    pub(crate) fn is_loaded(&self, model: &Path, scheme: Option<QuantScheme>) -> bool {
        let key = cache_key(model, scheme);
        self.cache.loaded().iter().any(|e| e.key == key)
    }

    /// Loads (or finds) a model. `estimate` is the resident size expected (default:
    /// the file's size, scaled by the scheme's bits when quantizing on load).
    pub(crate) fn acquire(
        &self,
        model: &Path,
        scheme: Option<QuantScheme>,
        estimate: Option<u64>,
    ) -> Result<afo_engine::Acquired<LoadedModel>> {
        let key = cache_key(model, scheme);
        let file = std::fs::metadata(model).map_or(0, |m| m.len());
        // While loading, tensors are read and converted beside what is already
        // loaded; the reservation covers that moment and is settled to the model's
        // measured bytes after. Measured peaks (SmolLM2): an F32 file loads at its
        // own size, a quantized one (Q8_0, Q4_1) briefly at about twice it (the tied
        // embedding is read, then converted), as does quantizing on load.
        let quantized = scheme.is_some()
            || self
                .stored_scheme(model)
                .is_some_and(|s| s.bits_per_weight() < 16.0);
        let transient = if quantized { file } else { file / 4 };
        let estimate = estimate.unwrap_or(file + transient);
        loop {
            // The cache reserves the estimate in the ledger before loading, evicting
            // its own idle models while the ledger refuses; when that is not enough,
            // the other cache's idle models and the prefix blocks can make room.
            let result = self.cache.acquire(&key, estimate, || {
                let mut loaded = match scheme {
                    None => LoadedModel::load(model),
                    Some(s) => LoadedModel::load_quantized(model, QuantPolicy::new(s), |_| {}),
                }?;
                loaded.set_kv_format(self.kv_format)?;
                Ok(loaded)
            });
            match result {
                Err(afo_engine::Error::ModelTooLarge { .. }) if self.make_room() => continue,
                other => {
                    let acquired = other?;
                    if !acquired.hit {
                        let chunk = self.estimate_text(
                            acquired.model.model(),
                            afo_engine::PREFILL_CHUNK,
                            0,
                            None,
                        );
                        afo_guard::reuse_workspace(chunk.estimate.activations);
                    }
                    return Ok(acquired);
                }
            }
        }
    }

    /// Generates without streaming.
    ///
    /// # Errors
    /// As [`Runtime::generate_stream`].
    pub fn generate(&self, request: &GenerateRequest) -> Result<GenerateResponse> {
        self.generate_stream(request, |_| ControlFlow::Continue(()))
    }

    /// Generates, calling `on_text` with each text delta; `on_text` returns
    /// [`ControlFlow::Break`] to cancel. Every call, successful or not, appends one
    /// SSOT v2 record when a log is configured.
    ///
    /// # Errors
    /// [`crate::Error::Refused`] when no plan fits under the cutline (with the plans tried), and
    /// the engine's errors.
    pub fn generate_stream<F>(
        &self,
        request: &GenerateRequest,
        on_text: F,
    ) -> Result<GenerateResponse>
    where
        F: FnMut(&str) -> ControlFlow<()>,
    {
        self.generate_selected(request, None, on_text)
    }

    /// [`Runtime::generate_stream`] with the selection that chose the model, for the
    /// record.
    pub(crate) fn generate_selected<F>(
        &self,
        request: &GenerateRequest,
        selection: Option<Selection>,
        on_text: F,
    ) -> Result<GenerateResponse>
    where
        F: FnMut(&str) -> ControlFlow<()>,
    {
        let start = Instant::now();
        let run_id = self.next_run_id();
        let tracker = PeakTracker::start(Some(self.ledger.clone()));
        let result = self.run(request, &run_id, start, on_text);
        self.settle_prefix_cache();
        let peak = tracker.finish();
        afo_guard::release_free_memory();
        match result {
            Ok(mut response) => {
                response.selection = selection;
                response.peak_memory_bytes = peak;
                response.badge = badge(peak, &self.budget);
                response.health_score = health_score(HealthInputs {
                    peak_bytes: peak,
                    cutline_bytes: self.budget.cutline(),
                    error: false,
                    fallback: response.admission.decision == "degraded",
                });
                response.latency_ms = start.elapsed().as_secs_f64() * 1e3;
                let mut report = RunReport::new(&run_id, "generate", &response.model_id);
                report.latency_ms = response.latency_ms;
                report.peak_memory_bytes = peak;
                report.tokens_in = response.prompt_tokens as u64;
                report.tokens_out = response.completion_tokens as u64;
                report.tokens_per_s = response.tokens_per_s;
                report.ttft_ms = response.timings.ttft_ms;
                report.predicted_peak_bytes = Some(response.predicted_peak_bytes);
                report.token_budget = Some(response.token_budget as u64);
                report.kv_cache_bytes = Some(response.kv_cache_bytes);
                report.kv_evicted_tokens = Some(response.kv_evicted_tokens);
                report.prefix_cache_hit_tokens = Some(response.prefix_cache_hit_tokens);
                if response.cache_hit {
                    report.reload_overhead_ms = Some(response.acquire_ms);
                } else {
                    report.load_ms = Some(response.acquire_ms);
                }
                report.selection = response.selection.clone();
                report.admission = Some(response.admission.clone());
                self.record(&report)?;
                Ok(response)
            }
            Err(err) => {
                let model_id = request
                    .model
                    .file_stem()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                let mut report = RunReport::new(&run_id, "generate", model_id);
                report.error = Some(err.to_string());
                report.latency_ms = start.elapsed().as_secs_f64() * 1e3;
                report.peak_memory_bytes = peak;
                report.selection = selection;
                report.admission = err.admission_record();
                self.record(&report)?;
                Err(err)
            }
        }
    }

    fn run<F>(
        &self,
        request: &GenerateRequest,
        run_id: &str,
        start: Instant,
        on_text: F,
    ) -> Result<GenerateResponse>
    where
        F: FnMut(&str) -> ControlFlow<()>,
    {
        let acquired = self.acquire(&request.model, request.scheme, None)?;
        let loaded = &acquired.model;
        let mut options = request.options.clone();
        let (prompt, reader) = match &request.prompt {
            Prompt::Text(text) => (loaded.encode_text(text)?, None),
            Prompt::Chat(messages) => {
                let encoded = loaded.encode_chat_with(messages, &request.chat)?;
                if options.constraint.is_none() {
                    options.constraint = tool_call_grammar(
                        &request.chat.tools,
                        &request.tool_choice,
                        encoded.tool_format,
                        true,
                    )?
                    .map(Constraint::lark);
                }
                let reader = ChatOutputParser::for_prompt(&encoded, !request.chat.tools.is_empty());
                (encoded.ids, Some(reader))
            }
        };
        let model = loaded.model();
        let (plan, admitted) =
            self.admit_text(model, prompt.len(), request.options.max_tokens, self.kv)?;
        tracing::debug!(estimate = %plan.estimate.estimate, run_id, plan = %plan.name, "admitted");
        let max_tokens = plan.max_tokens;
        options.max_tokens = max_tokens;
        let mut cache = plan.new_cache(model, prompt.len());
        let prefix = self.prefix_cache(&request.model, request.scheme);
        let generation = match &prefix {
            Some((prefixes, salt)) => generate_with_prefix(
                model,
                loaded.tokenizer(),
                &prompt,
                &options,
                &mut cache,
                PrefixReuse {
                    cache: prefixes,
                    salt: *salt,
                },
                on_text,
            )?,
            None => afo_engine::generate(
                model,
                loaded.tokenizer(),
                &prompt,
                &options,
                &mut cache,
                on_text,
            )?,
        };
        let tokens_per_s = generation.decode_tokens_per_s();
        let mut timings = generation.timings;
        // Time to first token counts from the request: model acquire included.
        timings.ttft_ms = first_token_ms(start, &generation.timings);
        Ok(GenerateResponse {
            run_id: run_id.to_owned(),
            model_id: loaded.id().to_owned(),
            output: reader.map(|r| ChatOutput::parse(r, &generation.text)),
            text: generation.text,
            finish: generation.finish,
            prompt_tokens: generation.prompt_tokens,
            completion_tokens: generation.tokens.len(),
            timings,
            tokens_per_s,
            cache_hit: acquired.hit,
            acquire_ms: acquired.acquire_ms,
            predicted_peak_bytes: admitted.predicted_peak_bytes,
            peak_memory_bytes: 0,
            cutline_bytes: self.budget.cutline(),
            badge: StatusBadge::Safe,
            health_score: 0.0,
            latency_ms: 0.0,
            token_budget: max_tokens,
            kv_cache_bytes: cache.bytes(),
            kv_evicted_tokens: cache.evicted_tokens() as u64,
            prefix_cache_hit_tokens: generation.prefix_hit_tokens as u64,
            selection: None,
            admission: admitted.record,
        })
    }

    /// The process's health now: the badge and score of the resident memory, the
    /// ledger, the loaded models.
    ///
    /// # Errors
    /// When the memory probe fails.
    pub fn health(&self) -> Result<Health> {
        let snapshot = self.probe.snapshot()?;
        self.ledger.observe_rss(snapshot.rss_bytes);
        let stats = self.cache.stats();
        let info = |e: afo_engine::LoadedEntry| LoadedModelInfo {
            key: e.key,
            bytes: e.bytes,
            in_use: e.in_use,
            pinned: e.pinned,
        };
        Ok(Health {
            badge: badge(snapshot.rss_bytes, &self.budget),
            health_score: health_score(HealthInputs {
                peak_bytes: snapshot.rss_bytes,
                cutline_bytes: self.budget.cutline(),
                error: false,
                fallback: false,
            }),
            rss_bytes: snapshot.rss_bytes,
            cutline_bytes: self.budget.cutline(),
            ledger: self.ledger.snapshot(),
            loaded_models: self
                .cache
                .loaded()
                .into_iter()
                .chain(self.vlm_cache.loaded())
                .map(info)
                .collect(),
            cache_hit_rate: stats.hit_rate(),
        })
    }

    pub(crate) fn next_run_id(&self) -> String {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let t = Timestamp::now().datetime().unix_timestamp_nanos();
        format!("{:x}-{}-{n}", t, std::process::id())
    }
}
