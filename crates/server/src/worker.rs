//! One engine worker thread per served model: for a text model it owns the model's
//! batching [`Scheduler`]; for a vision-language model it runs one job at a time
//! ([`crate::vision`]). Either takes jobs from a channel, streams each job's text back
//! over its own channel, cancels jobs whose client went away or whose time ran out,
//! and writes each job's SSOT record when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use afo_runtime::engine::{
    FinishReason, GenerateOptions, LoadedModel, PrefixReuse, RequestId, Scheduler,
    VisionLanguageModel,
};
use afo_runtime::guard::{Admission, HealthInputs, badge, health_score};
use afo_runtime::image::PreprocessorConfig;
use afo_runtime::kvcache::{PrefixCache, Salt};
use afo_runtime::ssot::{Record, RecordV1, RecordV2, RunStatus, Timestamp};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::RunObservation;
use crate::openai::Endpoint;
use crate::state::Shared;
use crate::vision::VisionJob;

/// What a job's channel carries, in order: `Started`, any number of `Text`, then
/// `Done` or `Failed` (or `Failed` alone).
#[derive(Debug)]
pub(crate) enum Event {
    /// The job was admitted and its prompt has run.
    Started,
    /// Generated text.
    Text(String),
    /// The job ended normally.
    Done(Done),
    /// The job ended with an error.
    Failed(ApiError),
}

/// How a job ended.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// One request handed to a worker.
#[derive(Debug)]
pub(crate) struct Job {
    pub run_id: String,
    pub endpoint: Endpoint,
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    pub events: UnboundedSender<Event>,
    /// When the HTTP request arrived.
    pub received: Instant,
    /// The run is cancelled when it is still going at this instant.
    pub deadline: Instant,
    /// A job not admitted by this instant is refused (503).
    pub admit_by: Instant,
    /// The bytes the job was predicted to add (KV cache, logits, slack).
    pub predicted_bytes: u64,
    /// How the model was chosen, for the record.
    pub selection: afo_runtime::ssot::Selection,
    /// A VLM chat's messages and images (the worker prepares its prompt).
    pub vision: Option<VisionJob>,
    /// Pixels fed to the vision encoder and pixels of the inputs, all images (VLM
    /// requests).
    pub image_pixels: Option<u64>,
    pub original_pixels: Option<u64>,
}

/// The model a worker serves.
#[derive(Debug, Clone)]
pub(crate) enum Served {
    /// A text model, batched by a scheduler.
    Text(Arc<LoadedModel>),
    /// A vision-language model with its image preprocessing, one job at a time.
    Vision {
        model: Arc<VisionLanguageModel>,
        pre: Arc<PreprocessorConfig>,
    },
}

/// The bytes a text request adds while it runs: its KV cache, two logit rows and 10%
/// slack, as the runtime's estimator allows for.
pub(crate) fn request_bytes(model: &LoadedModel, prompt_tokens: usize, max_tokens: usize) -> u64 {
    let c = model.model().config();
    let kv = (prompt_tokens + max_tokens) as u64
        * (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64;
    let logits = (c.vocab_size * 4 * 2) as u64;
    (kv + logits) * 11 / 10
}

/// A served model's worker: the shared model and the job queue of its thread.
#[derive(Debug)]
pub(crate) struct Worker {
    /// The model's id, as the API names it.
    pub id: String,
    /// The loaded model (also held by the thread).
    pub model: Served,
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Jobs given to the worker and not yet ended.
    pub queued: Arc<AtomicUsize>,
    /// Jobs running in the scheduler now.
    pub running: Arc<AtomicUsize>,
}

impl Worker {
    /// Starts the thread of `model`.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        id: String,
        model: Served,
        prefix: Option<(Arc<PrefixCache>, Salt)>,
    ) -> crate::Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let thread = {
            let shared = Arc::clone(shared);
            let model = model.clone();
            let thread_id = id.clone();
            let (queued, running) = (Arc::clone(&queued), Arc::clone(&running));
            std::thread::Builder::new()
                .name(format!("afo-worker-{id}"))
                .spawn(move || match &model {
                    Served::Text(m) => run(
                        &shared,
                        &thread_id,
                        m,
                        prefix.as_ref().map(|(c, s)| (c.as_ref(), *s)),
                        &rx,
                        &queued,
                        &running,
                    ),
                    Served::Vision { model, .. } => {
                        crate::vision::run(&shared, &thread_id, model, &rx, &queued, &running);
                    }
                })
                .map_err(|source| crate::Error::Worker {
                    model: id.clone(),
                    source,
                })?
        };
        Ok(Arc::new(Self {
            id,
            model,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            queued,
            running,
        }))
    }

    /// Whether the model takes images: a worker over a VLM, whose jobs carry the
    /// preprocessed images.
    pub(crate) fn accepts_images(&self) -> bool {
        matches!(self.model, Served::Vision { .. })
    }

    /// Hands a job to the thread.
    pub(crate) fn submit(&self, job: Job) -> Result<(), ApiError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = jobs.as_ref() else {
            return Err(ApiError::unavailable(
                "the server is shutting down",
                "shutting_down",
                5,
            ));
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        tx.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            ApiError::internal(format!("the worker of model `{}` has stopped", self.id))
        })
    }

    /// Closes the queue and waits for the thread to finish the jobs it holds.
    pub(crate) fn stop(&self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!(model = %self.id, "worker thread panicked");
        }
    }
}

/// Why the worker cancelled a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancel {
    Client,
    Deadline,
    Admission,
}

/// A job being run, with what its record needs.
pub(crate) struct Active {
    pub job: Job,
    pub started: bool,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub completion_tokens: usize,
    pub peak_bytes: u64,
    /// Resident memory when the job started.
    pub start_rss: Option<u64>,
    pub cancel: Option<Cancel>,
    /// Prompt tokens reused from the prefix cache.
    pub prefix_hit_tokens: Option<u64>,
}

impl Active {
    /// A job not started yet.
    pub(crate) fn new(job: Job) -> Self {
        Self {
            job,
            started: false,
            first_token: None,
            last_token: None,
            completion_tokens: 0,
            peak_bytes: 0,
            start_rss: None,
            cancel: None,
            prefix_hit_tokens: None,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    shared: &Arc<Shared>,
    model_id: &str,
    model: &LoadedModel,
    prefix: Option<(&PrefixCache, Salt)>,
    rx: &Receiver<Job>,
    queued: &AtomicUsize,
    running: &AtomicUsize,
) {
    let runtime = Arc::clone(&shared.runtime);
    let cutline = runtime.budget().cutline();
    let start_rss = runtime.resident_bytes().unwrap_or(0);
    let kv_budget = cutline.saturating_sub(start_rss);
    let mut sched = Scheduler::new(
        model.model(),
        model.tokenizer(),
        shared.config.max_batch,
        kv_budget,
    );
    if let Some((cache, salt)) = prefix {
        sched.set_prefix_cache(PrefixReuse { cache, salt });
    }
    {
        let runtime = Arc::clone(&runtime);
        let extra = (model.model().config().vocab_size * 4 * 2) as u64;
        sched.set_admission(move |kv_bytes| {
            let bytes = (kv_bytes + extra) * 11 / 10;
            let in_use = runtime.resident_bytes().unwrap_or(cutline);
            match runtime.guard().admit(bytes, in_use, &[]) {
                Admission::Admit(r) => Some(Box::new(r) as Box<dyn std::any::Any>),
                Admission::Degrade { .. } | Admission::Refuse(_) => None,
            }
        });
    }
    let bytes_per_token = {
        let c = model.model().config();
        (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64
    };
    let mut active: HashMap<RequestId, Active> = HashMap::new();
    let mut closed = false;
    let add =
        |sched: &mut Scheduler<'_>, active: &mut HashMap<RequestId, Active>, job: Job| match sched
            .add_request(job.prompt.clone(), job.options.clone())
        {
            Ok(id) => {
                active.insert(id, Active::new(job));
            }
            Err(e) => {
                queued.fetch_sub(1, Ordering::SeqCst);
                let _ = job.events.send(Event::Failed(ApiError::invalid(format!(
                    "the request cannot run on model `{model_id}`: {e}"
                ))));
            }
        };
    loop {
        if !sched.has_unfinished() {
            if closed {
                break;
            }
            match rx.recv() {
                Ok(job) => add(&mut sched, &mut active, job),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => add(&mut sched, &mut active, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let now = Instant::now();
        for (&id, a) in &mut active {
            let why = if a.job.events.is_closed() {
                Some(Cancel::Client)
            } else if now >= a.job.deadline {
                Some(Cancel::Deadline)
            } else if !a.started && now >= a.job.admit_by {
                Some(Cancel::Admission)
            } else {
                None
            };
            if let Some(why) = why.filter(|_| a.cancel.is_none()) {
                a.cancel = Some(why);
                sched.cancel(id);
            }
        }
        let outputs = match sched.step() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(model = model_id, error = %e, "scheduler step failed");
                let ids: Vec<RequestId> = active.keys().copied().collect();
                for id in ids {
                    sched.cancel(id);
                    if let Some(a) = active.remove(&id) {
                        queued.fetch_sub(1, Ordering::SeqCst);
                        let err = ApiError::internal(format!(
                            "generation failed on model `{model_id}`: {e}"
                        ));
                        finish(
                            shared,
                            model_id,
                            &a,
                            None,
                            Some(&err.message),
                            bytes_per_token,
                        );
                        let _ = a.job.events.send(Event::Failed(err));
                    }
                }
                continue;
            }
        };
        running.store(sched.running(), Ordering::SeqCst);
        let rss = runtime.resident_bytes().unwrap_or(0);
        for a in active.values_mut() {
            a.peak_bytes = a.peak_bytes.max(rss);
        }
        let now = Instant::now();
        let stepped = !outputs.is_empty();
        for o in outputs {
            let Some(a) = active.get_mut(&o.id) else {
                continue;
            };
            if let Some(hit) = o.prefix_hit_tokens {
                a.prefix_hit_tokens = Some(hit as u64);
            }
            if !a.started && o.token.is_some() {
                a.started = true;
                a.first_token = Some(now);
                a.start_rss = Some(rss);
                let _ = a.job.events.send(Event::Started);
            }
            if o.token.is_some() && o.finish != Some(FinishReason::Eos) {
                a.completion_tokens += 1;
                a.last_token = Some(now);
            }
            if !o.text.is_empty() {
                let _ = a.job.events.send(Event::Text(o.text));
            }
            let Some(reason) = o.finish else {
                continue;
            };
            let Some(a) = active.remove(&o.id) else {
                continue;
            };
            queued.fetch_sub(1, Ordering::SeqCst);
            match (reason, a.cancel) {
                (FinishReason::Cancelled, _) => ended(shared, model_id, &a, bytes_per_token),
                (reason, _) => {
                    finish(shared, model_id, &a, Some(reason), None, bytes_per_token);
                    let _ = a.job.events.send(Event::Done(Done {
                        finish: reason,
                        prompt_tokens: a.job.prompt.len(),
                        completion_tokens: a.completion_tokens,
                    }));
                }
            }
        }
        if !stepped && sched.running() == 0 {
            // Waiting requests that the memory guard holds back: look again soon.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    running.store(0, Ordering::SeqCst);
    tracing::debug!(model = model_id, "worker stopped");
}

/// Ends a cancelled job (`a.cancel` says why; `None` counts as the client): writes
/// its record, and tells the client why when it is still there.
pub(crate) fn ended(shared: &Shared, model_id: &str, a: &Active, bytes_per_token: u64) {
    let err = match a.cancel {
        Some(Cancel::Client) | None => {
            finish(
                shared,
                model_id,
                a,
                None,
                Some("cancelled: the client went away"),
                bytes_per_token,
            );
            return;
        }
        Some(Cancel::Deadline) => ApiError::timeout(shared.config.request_timeout),
        Some(Cancel::Admission) => ApiError::unavailable(
            format!(
                "no memory left under the cutline to start the request within {} s",
                shared.config.admission_timeout.as_secs_f64()
            ),
            "memory_unavailable",
            2,
        ),
    };
    finish(
        shared,
        model_id,
        a,
        None,
        Some(&err.message),
        bytes_per_token,
    );
    let _ = a.job.events.send(Event::Failed(err));
}

/// Writes the job's SSOT record and metrics. `finish` is `None` for a job that ended
/// in an error (or was cancelled), whose text is `error`.
pub(crate) fn finish(
    shared: &Shared,
    model_id: &str,
    a: &Active,
    finish: Option<FinishReason>,
    error: Option<&str>,
    bytes_per_token: u64,
) {
    let end = Instant::now();
    let latency_s = end.duration_since(a.job.received).as_secs_f64();
    let ttft_s = a
        .first_token
        .map(|t| t.duration_since(a.job.received).as_secs_f64());
    let decode_s = match (a.first_token, a.last_token) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    let tpot_s = (a.completion_tokens > 1).then(|| decode_s / (a.completion_tokens - 1) as f64);
    let outcome = match (finish, a.cancel) {
        (Some(_), _) => "ok",
        (None, Some(Cancel::Client)) => "cancelled",
        (None, _) => "error",
    };
    shared.metrics.run(&RunObservation {
        model: model_id,
        operation: a.job.endpoint.operation(),
        outcome,
        duration_s: latency_s,
        ttft_s,
        tpot_s,
        input_tokens: a.job.prompt.len() as u64,
        output_tokens: a.completion_tokens as u64,
    });
    let runtime = &shared.runtime;
    let budget = runtime.budget();
    let peak = a.peak_bytes.max(runtime.resident_bytes().unwrap_or(0));
    let failed = finish.is_none();
    let base = RecordV1 {
        schema_version: 2,
        ts: Timestamp::now(),
        run_id: a.job.run_id.clone(),
        chain: "generate".to_owned(),
        model_id: model_id.to_owned(),
        status: if failed {
            RunStatus::Error
        } else {
            RunStatus::Ok
        },
        error: error.map(str::to_owned),
        latency_ms: latency_s * 1e3,
        peak_memory_bytes: peak,
        cutline_bytes: budget.cutline(),
        tokens_in: a.job.prompt.len() as u64,
        tokens_out: a.completion_tokens as u64,
        tokens_per_s: if decode_s > 0.0 && a.completion_tokens > 1 {
            (a.completion_tokens - 1) as f64 / decode_s
        } else {
            0.0
        },
    };
    let mut record = RecordV2::new(base);
    record.status_badge = Some(badge(peak, budget));
    record.health_score = Some(health_score(HealthInputs {
        peak_bytes: peak,
        cutline_bytes: budget.cutline(),
        error: failed,
        fallback: a.job.selection.fallback_from.is_some(),
    }));
    record.token_budget = Some(a.job.options.max_tokens as u64);
    record.kv_cache_size =
        Some((a.job.prompt.len() + a.completion_tokens) as u64 * bytes_per_token);
    record.kv_evicted_tokens = Some(0);
    record.prefix_cache_hit_tokens = a.prefix_hit_tokens;
    record.predicted_peak_bytes = a.start_rss.map(|r| r + a.job.predicted_bytes);
    record.ttft_ms = ttft_s.map(|t| t * 1e3);
    record.selection = Some(a.job.selection.clone());
    record.image_pixels = a.job.image_pixels;
    record.original_pixels = a.job.original_pixels;
    record.lazy_cache_hit_rate = runtime.health().ok().and_then(|h| h.cache_hit_rate);
    let record = Record::from(record);
    if let Err(e) = runtime.append_record(&record) {
        tracing::error!(run_id = %a.job.run_id, error = %e, "writing the SSOT record failed");
    }
    shared.push_recent(&record);
}
