//! The state every handler and worker shares: the runtime, the settings, the
//! workers, the metrics and the recent runs.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afo_runtime::Runtime;
use afo_runtime::engine::VisionLanguageModel;
use afo_runtime::image::PreprocessorConfig;
use afo_runtime::quant::QuantScheme;
use afo_runtime::ssot::Record;

use crate::error::ApiError;
use crate::history::{History, Sample};
use crate::metrics::Metrics;
use crate::openai::ParseLimits;
use crate::worker::{Served, Worker};

/// The server's settings (see [`crate::ServerBuilder`] for each default).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub limits: ParseLimits,
    pub max_queue: usize,
    pub max_batch: usize,
    pub request_timeout: Duration,
    pub queue_timeout: Duration,
    pub worker_idle: Duration,
    pub default_max_tokens: usize,
    pub recent_runs: usize,
    pub prefill_chunk: usize,
    pub connections: crate::conn::ConnLimits,
    pub public_metrics: bool,
    pub history_samples: usize,
    pub history_interval: Duration,
}

/// A model the server offers by id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelSpec {
    pub id: String,
    pub path: PathBuf,
    pub scheme: Option<QuantScheme>,
}

/// The model a request runs on, with how it was chosen.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub spec: ModelSpec,
    pub selection: afo_runtime::ssot::Selection,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub runtime: Arc<Runtime>,
    pub config: Config,
    pub metrics: Metrics,
    pub models: Vec<ModelSpec>,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    recent: Mutex<VecDeque<serde_json::Value>>,
    /// The recent health samples, for `/api/history` and the dashboard's charts.
    pub history: History,
    pub started: Instant,
    pub accepting: AtomicBool,
    /// Set when the shutdown grace has run out: workers end every job now.
    abort: AtomicBool,
    runs: AtomicU64,
}

impl Shared {
    pub(crate) fn new(runtime: Arc<Runtime>, config: Config, models: Vec<ModelSpec>) -> Self {
        let history = History::new(config.history_samples, config.history_interval);
        Self {
            history,
            runtime,
            config,
            metrics: Metrics::default(),
            models,
            workers: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
            started: Instant::now(),
            accepting: AtomicBool::new(true),
            abort: AtomicBool::new(false),
            runs: AtomicU64::new(0),
        }
    }

    /// Each served model's waiting and running requests, in the order of
    /// `self.models` (0 and 0 for a model without a worker).
    pub(crate) fn queues(&self) -> Vec<(u32, u32)> {
        let workers = self.workers();
        self.models
            .iter()
            .map(|m| {
                let Some(w) = workers.iter().find(|w| w.id == m.id) else {
                    return (0, 0);
                };
                let queued = w.queued.load(Ordering::SeqCst);
                let running = w.running.load(Ordering::SeqCst);
                let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
                (n(queued.saturating_sub(running)), n(running))
            })
            .collect()
    }

    /// Adds a sample of the health now to the history when one is due (see
    /// [`History::sample_if_due`]); nothing when the memory probe fails.
    pub(crate) fn sample_history(&self) {
        self.history.sample_if_due(|| {
            let h = self
                .runtime
                .health()
                .map_err(
                    |e| tracing::debug!(error = %e, "no history sample: the memory probe failed"),
                )
                .ok()?;
            let (waiting, running) = self.queues().into_iter().unzip();
            Some(Sample {
                t_ms: crate::history::unix_ms(),
                resident_bytes: h.rss_bytes,
                reserved_bytes: h.ledger.reserved_total(),
                cutline_bytes: h.cutline_bytes,
                warn_bytes: self.runtime.budget().warn_bytes(),
                badge: h.badge,
                waiting,
                running,
            })
        });
    }

    /// Whether the workers must end every job now (the shutdown grace ran out).
    pub(crate) fn aborting(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// Tells the workers to end every job now; each still writes its record.
    pub(crate) fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }

    /// A fresh run id: the time in hex, the process and a counter.
    pub(crate) fn next_run_id(&self) -> String {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{t:x}-{}-{n}", std::process::id())
    }

    /// The model a request for `model` runs on: a served id, or `auto` (the
    /// selector over the runtime's catalog, or the first served model without one).
    pub(crate) fn resolve(
        &self,
        model: &str,
        text: &str,
        images: usize,
    ) -> Result<Target, ApiError> {
        if model == "auto" {
            if self.runtime.has_catalog() {
                let routed = self.runtime.route(text, images).map_err(|e| {
                    ApiError::unavailable(
                        format!("model selection failed: {e}"),
                        "selection_failed",
                        5,
                    )
                })?;
                let id = self
                    .models
                    .iter()
                    .find(|m| m.path == routed.path && m.scheme == routed.scheme)
                    .map_or(routed.card_id.clone(), |m| m.id.clone());
                return Ok(Target {
                    spec: ModelSpec {
                        id,
                        path: routed.path,
                        scheme: routed.scheme,
                    },
                    selection: routed.selection,
                });
            }
            let Some(first) = self.models.first() else {
                return Err(ApiError::model_not_found(model));
            };
            return Ok(Target {
                spec: first.clone(),
                selection: afo_runtime::ssot::Selection {
                    model_id: first.id.clone(),
                    reason: "auto without a catalog: the first model served".to_owned(),
                    fallback_from: None,
                    trinity_score: None,
                },
            });
        }
        let spec = self
            .models
            .iter()
            .find(|m| m.id == model)
            .ok_or_else(|| ApiError::model_not_found(model))?;
        Ok(Target {
            spec: spec.clone(),
            selection: afo_runtime::ssot::Selection {
                model_id: spec.id.clone(),
                reason: "explicit".to_owned(),
                fallback_from: None,
                trinity_score: None,
            },
        })
    }

    fn worker_key(spec: &ModelSpec) -> String {
        match spec.scheme {
            Some(s) => format!("{}#{s}", spec.path.display()),
            None => spec.path.display().to_string(),
        }
    }

    /// The worker of `spec` and its model, loading the model and starting its thread
    /// on first use (or after the worker retired). Blocks while a model loads: call
    /// it off the async threads.
    pub(crate) fn worker(
        self: &Arc<Self>,
        spec: &ModelSpec,
    ) -> Result<(Arc<Worker>, Served), ApiError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable(
                "the server is shutting down",
                "shutting_down",
                5,
            ));
        }
        let key = Self::worker_key(spec);
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = workers.get(&key) {
            if let Some(served) = w.served().filter(|_| !w.retired()) {
                return Ok((Arc::clone(w), served));
            }
            // Retired when idle: its model went back to the cache, to be acquired
            // again (a hit, unless a load or a run needed its bytes meanwhile).
            if let Some(w) = workers.remove(&key) {
                w.stop();
            }
        }
        drop(workers);
        let served = self.load(spec)?;
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = workers.get(&key).filter(|w| !w.retired())
            && let Some(served) = w.served()
        {
            // Another request started one meanwhile.
            return Ok((Arc::clone(w), served));
        }
        // Text models reuse prompt prefixes (a system prompt, a chat history) through
        // the runtime's prefix cache of that model.
        let prefix = match &served {
            Served::Text(_) => self.runtime.prefix_cache(&spec.path, spec.scheme),
            Served::Vision { .. } => None,
        };
        let worker = Worker::start(self, spec.id.clone(), served.clone(), prefix)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if let Some(old) = workers.insert(key, Arc::clone(&worker)) {
            old.stop();
        }
        Ok((worker, served))
    }

    /// Loads `spec`'s model through the runtime (its bytes reserved in the ledger
    /// first). A load that does not fit while other models are busy waits for them
    /// to go idle, up to the queue timeout.
    fn load(&self, spec: &ModelSpec) -> Result<Served, ApiError> {
        let until = Instant::now() + self.config.queue_timeout;
        loop {
            match self.try_load(spec) {
                Err(e) if e.is_refusal() && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.is_refusal() => {
                    return Err(ApiError::unavailable(
                        format!("model `{}` does not fit under the cutline: {e}", spec.id),
                        "memory_unavailable",
                        5,
                    ));
                }
                Err(e) => {
                    return Err(ApiError::internal(format!(
                        "loading model `{}`: {e}",
                        spec.id
                    )));
                }
                Ok(served) => return Ok(served),
            }
        }
    }

    fn try_load(&self, spec: &ModelSpec) -> afo_runtime::Result<Served> {
        if VisionLanguageModel::is_vlm_dir(&spec.path) {
            if spec.scheme.is_some() {
                tracing::warn!(model = %spec.id, "a vision-language model is served as stored, not quantized");
            }
            let acquired = self.runtime.acquire_vision_model(&spec.path)?;
            let config = spec.path.join("preprocessor_config.json");
            let pre = if config.is_file() {
                PreprocessorConfig::from_file(&config).map_err(|source| {
                    afo_runtime::Error::Image {
                        name: config.display().to_string(),
                        source,
                    }
                })?
            } else {
                PreprocessorConfig::qwen3_vl()
            }
            // One frame per patch row for still images (the encoder folds its kernel
            // over the frames): half the pixel values a queued request holds.
            .with_pixel_layout(afo_runtime::image::PixelLayout::Compact);
            Ok(Served::Vision {
                model: acquired.model,
                pre: Arc::new(pre),
            })
        } else {
            let acquired = self.runtime.acquire_model(&spec.path, spec.scheme)?;
            Ok(Served::Text(acquired.model))
        }
    }

    /// The workers started so far.
    pub(crate) fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Stops taking jobs, lets every worker finish what it holds, and joins them.
    pub(crate) fn stop_workers(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        let workers: Vec<Arc<Worker>> = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in workers {
            w.stop();
        }
    }

    /// Writes the SSOT record of a request that ended before a worker took it: the
    /// error it got (a refusal for memory or a full queue, or an invalid request),
    /// with the ledger's figures when it was refused for memory.
    pub(crate) fn record_rejection(&self, model: Option<&str>, err: &ApiError, received: Instant) {
        self.record_rejection_in("generate", model, err, received);
    }

    /// [`Shared::record_rejection`] for a request of another kind of run (`chain`).
    pub(crate) fn record_rejection_in(
        &self,
        chain: &str,
        model: Option<&str>,
        err: &ApiError,
        received: Instant,
    ) {
        let memory = self.runtime.memory();
        let mut report =
            afo_runtime::RunReport::new(self.next_run_id(), chain, model.unwrap_or(""));
        report.error = Some(format!(
            "{} ({}): {}",
            err.status.as_u16(),
            err.code.unwrap_or(err.kind),
            err.message
        ));
        report.latency_ms = received.elapsed().as_secs_f64() * 1e3;
        report.peak_memory_bytes = memory.rss;
        if matches!(
            err.code,
            Some("memory_unavailable" | "memory_busy" | "queue_full")
        ) {
            report.admission = Some(afo_runtime::ssot::AdmissionRecord {
                decision: "refused".to_owned(),
                plan: "as asked".to_owned(),
                tried: vec!["as asked".to_owned()],
                reserved_bytes: memory.reserved_total(),
                run_bytes: 0,
                unaccounted_bytes: memory.unaccounted,
            });
        }
        match self.runtime.record(&report) {
            Ok(record) => self.push_recent(&record),
            Err(e) => {
                tracing::error!(error = %e, "writing the SSOT record of a refused request failed")
            }
        }
    }

    /// Remembers a record for the dashboard's list of recent runs.
    pub(crate) fn push_recent(&self, record: &Record) {
        let Some(value) = record
            .to_json()
            .ok()
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        else {
            return;
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_front(value);
        recent.truncate(self.config.recent_runs);
    }

    /// The recent runs, newest first.
    pub(crate) fn recent(&self) -> Vec<serde_json::Value> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
