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

use afo_runtime::RunReport;
use afo_runtime::engine::{
    FinishReason, GenerateOptions, LoadedModel, PrefixReuse, RequestId, Scheduler,
    VisionLanguageModel,
};
use afo_runtime::guard::{KindBytes, Refusal, Reservation};
use afo_runtime::image::PreprocessorConfig;
use afo_runtime::kvcache::{PrefixCache, Salt};
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
    /// The log-probabilities of the token whose text (if any) comes next, when the
    /// job asked for them.
    Logprob(crate::logprobs::TokenLogprob),
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
    /// A job not started by this instant is refused: 429 when it waited behind
    /// other work, 503 when the ledger had no room for it.
    pub admit_by: Instant,
    /// The bytes the job reserves when admitted (KV cache, workspace, images), by
    /// the runtime's estimator.
    pub parts: KindBytes,
    /// The ledger's hold on what the job already holds while queued (its decoded
    /// images), given back when the job ends.
    pub held: Option<Reservation>,
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

/// A served model's worker: the shared model and the job queue of its thread.
#[derive(Debug)]
pub(crate) struct Worker {
    /// The model's id, as the API names it.
    pub id: String,
    /// The loaded model while the thread runs (the thread holds it too); `None` once
    /// the thread has retired, so that the model can be evicted.
    slot: Arc<Mutex<Option<Served>>>,
    /// Whether the model takes images.
    vision: bool,
    /// The job queue; `None` once the thread has stopped (shut down, or retired
    /// when idle so that its model can be evicted).
    jobs: Arc<Mutex<Option<Sender<Job>>>>,
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
        let jobs = Arc::new(Mutex::new(Some(tx)));
        let vision = matches!(model, Served::Vision { .. });
        let slot = Arc::new(Mutex::new(Some(model.clone())));
        let thread = {
            let shared = Arc::clone(shared);
            let model = model.clone();
            let thread_id = id.clone();
            let (queued, running) = (Arc::clone(&queued), Arc::clone(&running));
            let idle = Idle {
                jobs: Arc::clone(&jobs),
                slot: Arc::clone(&slot),
                after: shared.config.worker_idle,
            };
            std::thread::Builder::new()
                .name(format!("afo-worker-{id}"))
                .spawn(move || {
                    match &model {
                        Served::Text(m) => run(
                            &shared,
                            &thread_id,
                            m,
                            prefix.as_ref().map(|(c, s)| (c.as_ref(), *s)),
                            &rx,
                            &idle,
                            &queued,
                            &running,
                        ),
                        Served::Vision { model, .. } => {
                            crate::vision::run(
                                &shared, &thread_id, model, &rx, &idle, &queued, &running,
                            );
                        }
                    }
                    // The model goes back to the cache idle (evictable when a load or
                    // a run needs its bytes), and freed memory back to the system.
                    drop(model);
                    afo_runtime::guard::release_free_memory();
                })
                .map_err(|source| crate::Error::Worker {
                    model: id.clone(),
                    source,
                })?
        };
        Ok(Arc::new(Self {
            id,
            slot,
            vision,
            jobs,
            thread: Mutex::new(Some(thread)),
            queued,
            running,
        }))
    }

    /// Whether the model takes images: a worker over a VLM, whose jobs carry the
    /// preprocessed images.
    pub(crate) fn accepts_images(&self) -> bool {
        self.vision
    }

    /// The served model, while the thread runs.
    pub(crate) fn served(&self) -> Option<Served> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Hands a job to the thread; gives it back when the thread has stopped (the
    /// caller starts a new worker, or answers that the server is shutting down).
    pub(crate) fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = jobs.as_ref() else {
            return Err(Box::new(job));
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        tx.send(job).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            Box::new(e.0)
        })
    }

    /// Whether the thread has stopped taking jobs.
    pub(crate) fn retired(&self) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
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
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// When an idle worker retires: after `after` with no job, it closes its queue (under
/// the queue's lock, so no job is lost) and its thread ends, letting go of its model.
#[derive(Debug)]
pub(crate) struct Idle {
    jobs: Arc<Mutex<Option<Sender<Job>>>>,
    slot: Arc<Mutex<Option<Served>>>,
    after: Duration,
}

impl Idle {
    /// Waits for the next job; `None` when the queue is closed, or the worker
    /// retired after its idle time.
    pub(crate) fn next(&self, rx: &Receiver<Job>) -> Option<Job> {
        match rx.recv_timeout(self.after) {
            Ok(job) => Some(job),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
                match rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(_) => {
                        jobs.take();
                        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                        None
                    }
                }
            }
        }
    }
}

/// Why the worker cancelled a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancel {
    /// The client went away.
    Client,
    /// The request ran past its time limit.
    Deadline,
    /// The request waited in the queue past the queue timeout behind other work
    /// (429).
    Queue,
    /// The request waited past the queue timeout because the ledger had no room for
    /// it (503, with the ledger's numbers).
    Memory(Refusal),
    /// The server stopped before the request ended (its shutdown grace ran out).
    Shutdown,
}

impl Cancel {
    /// Why a job that waited to start past its queue deadline did not start:
    /// `memory`, the ledger's refusal when that was what held it back.
    pub(crate) fn queued(memory: Option<Refusal>) -> Self {
        memory.map_or(Cancel::Queue, Cancel::Memory)
    }
}

/// A job being run, with what its record needs.
pub(crate) struct Active {
    pub job: Job,
    pub started: bool,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub completion_tokens: usize,
    pub peak_bytes: u64,
    /// The resident memory the ledger predicted when it admitted the job.
    pub predicted_peak: Option<u64>,
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
            predicted_peak: None,
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
    idle: &Idle,
    queued: &AtomicUsize,
    running: &AtomicUsize,
) {
    let runtime = Arc::clone(&shared.runtime);
    // No budget of its own: each request is admitted on the runtime's ledger.
    let mut sched = Scheduler::new(model.model(), model.tokenizer(), shared.config.max_batch);
    if let Some((cache, salt)) = prefix {
        sched.set_prefix_cache(PrefixReuse { cache, salt });
    }
    sched.set_admission(runtime.batch_admission(model.model()));
    sched.set_prefill_chunk(shared.config.prefill_chunk);
    let bytes_per_token = model.model().kv_bytes_per_token();
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
            match idle.next(rx) {
                Some(job) => add(&mut sched, &mut active, job),
                None => break,
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
        let aborting = shared.aborting();
        let memory_wait = sched.memory_wait().copied();
        for (&id, a) in &mut active {
            let why = if aborting {
                Some(Cancel::Shutdown)
            } else if a.job.events.is_closed() {
                Some(Cancel::Client)
            } else if now >= a.job.deadline {
                Some(Cancel::Deadline)
            } else if sched.is_waiting(id) && now >= a.job.admit_by {
                Some(Cancel::queued(memory_wait))
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
        // Prompts running count as running: their memory is reserved and the model
        // is working on them.
        running.store(sched.running() + sched.prefilling(), Ordering::SeqCst);
        let rss = runtime.memory().rss;
        for a in active.values_mut() {
            a.peak_bytes = a.peak_bytes.max(rss);
        }
        let now = Instant::now();
        let stepped = !outputs.is_empty();
        if outputs.iter().any(|o| o.prefix_hit_tokens.is_some()) {
            // A request ran its prompt and published its blocks: the prefix cache's
            // bytes move from the request's workspace to the cache's own reservation.
            runtime.settle_prefix_cache();
        }
        for o in outputs {
            let Some(a) = active.get_mut(&o.id) else {
                continue;
            };
            if let Some(hit) = o.prefix_hit_tokens {
                a.prefix_hit_tokens = Some(hit as u64);
            }
            if let Some(p) = o.predicted_peak_bytes {
                a.predicted_peak = Some(p);
            }
            if !a.started && o.token.is_some() {
                a.started = true;
                a.first_token = Some(now);
                let _ = a.job.events.send(Event::Started);
            }
            if o.token.is_some() && o.finish != Some(FinishReason::Eos) {
                a.completion_tokens += 1;
                a.last_token = Some(now);
            }
            if let Some(lp) = &o.logprobs {
                let lp = crate::logprobs::from_engine(model.tokenizer(), lp);
                let _ = a.job.events.send(Event::Logprob(lp));
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
        if !stepped && sched.running() == 0 && sched.prefilling() == 0 {
            // Waiting requests that the ledger holds back: look again soon.
            std::thread::sleep(Duration::from_millis(5));
        }
        if !sched.has_unfinished() {
            // A burst is over: blocks published to the prefix cache are settled in
            // the ledger, and freed memory goes back to the system.
            runtime.settle_prefix_cache();
            afo_runtime::guard::release_free_memory();
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
        Some(Cancel::Queue) => {
            shared.metrics.rejected("queue_timeout");
            ApiError::busy(
                format!(
                    "model `{model_id}` is busy: the request waited {} s in the queue behind other requests without starting; retry shortly",
                    shared.config.queue_timeout.as_secs_f64()
                ),
                "queue_timeout",
                2,
            )
        }
        Some(Cancel::Memory(refusal)) => {
            shared.metrics.rejected("memory");
            ApiError::unavailable(
                format!(
                    "no memory under the cutline to start the request within {} s: it {refusal}",
                    shared.config.queue_timeout.as_secs_f64()
                ),
                "memory_unavailable",
                5,
            )
        }
        Some(Cancel::Shutdown) => ApiError::unavailable(
            "the server shut down before the request ended",
            "shutting_down",
            5,
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
    let peak = a.peak_bytes.max(runtime.memory().rss);
    let mut report = RunReport::new(&a.job.run_id, "generate", model_id);
    report.error = error.map(str::to_owned);
    report.latency_ms = latency_s * 1e3;
    report.peak_memory_bytes = peak;
    report.tokens_in = a.job.prompt.len() as u64;
    report.tokens_out = a.completion_tokens as u64;
    report.tokens_per_s = (decode_s > 0.0 && a.completion_tokens > 1)
        .then(|| (a.completion_tokens - 1) as f64 / decode_s);
    report.token_budget = Some(a.job.options.max_tokens as u64);
    report.kv_cache_bytes =
        Some((a.job.prompt.len() + a.completion_tokens) as u64 * bytes_per_token);
    report.kv_evicted_tokens = Some(0);
    report.prefix_cache_hit_tokens = a.prefix_hit_tokens;
    report.predicted_peak_bytes = a.predicted_peak;
    report.ttft_ms = ttft_s.map(|t| t * 1e3);
    report.selection = Some(a.job.selection.clone());
    report.image_pixels = a.job.image_pixels;
    report.original_pixels = a.job.original_pixels;
    match runtime.record(&report) {
        Ok(record) => shared.push_recent(&record),
        Err(e) => {
            tracing::error!(run_id = %a.job.run_id, error = %e, "writing the SSOT record failed");
        }
    }
}
