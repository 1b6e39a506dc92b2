//! Continuous batching: many sequences decoded together, admitted between steps.
//!
//! The engine loop of vLLM: [`Scheduler::add_request`] queues a request,
//! [`Scheduler::step`] admits waiting requests while the admission hook grants them
//! memory, runs at most one prefill chunk ([`Scheduler::set_prefill_chunk`] tokens,
//! default [`DEFAULT_PREFILL_CHUNK`]) of the oldest admitted prompt, then one decode
//! step for every running sequence as a single batched forward pass
//! ([`Model::forward_batch`]), and [`Scheduler::has_unfinished`] says whether to go
//! on. A long prompt therefore runs over several steps, interleaved with the decode
//! steps of the sequences already running (they keep streaming), and a request can be
//! cancelled between two of its chunks. Each request has its own
//! sampling parameters, stop strings and token budget; each step returns every
//! request's new text, so callers stream; [`Scheduler::cancel`] ends one cleanly.
//!
//! With [`Scheduler::set_prefix_cache`], each admitted request starts from the longest
//! cached prefix of its prompt and publishes its prompt's blocks after its prefill, so
//! a request admitted after another with the same system prompt or history (in the
//! same step too) runs only what differs; see [`crate::generate_with_prefix`].

use std::collections::{HashMap, VecDeque};

use afo_guard::{MemoryKind, Refusal, Reservation};
use afo_kvcache::KvCache;

use crate::constraint::{SeqConstraint, overlap};
use crate::error::{Error, Result};
use crate::generate::{
    Decode, FinishReason, GenerateOptions, PrefixReuse, publish_prefix, seed_from_prefix,
};
use crate::logprobs::{TokenLogprobs, check_top, token_logprobs};
use crate::model::Model;
use crate::reasoning::BudgetState;
use crate::sampler::Sampler;
use crate::stream::{StopMatcher, StreamDecoder};
use crate::tokenizer::Tokenizer;

/// A request's id in a [`Scheduler`].
pub type RequestId = u64;

/// Prompt tokens one [`Scheduler::step`] runs by default: the sequences decoding
/// meanwhile wait one chunk at most. Measured on SmolLM2 with 2 threads
/// (`scripts/e2e/interleave.py`): a 3,000-token prompt arriving beside a stream took
/// the same 34 s with chunks of 64, 128 and 256 tokens, while the stream's largest gap
/// between tokens was 1.1, 2.0 and 4.0 s (46.5 s unchunked).
pub const DEFAULT_PREFILL_CHUNK: usize = 64;

/// What one request produced in one [`Scheduler::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The request.
    pub id: RequestId,
    /// New text (may be empty while a character or a stop string is incomplete).
    pub text: String,
    /// The token sampled this step, if one was.
    pub token: Option<u32>,
    /// With [`GenerateOptions::logprobs`]: the log-probabilities of this step's token
    /// (not of an end-of-sequence token, which is not part of the output).
    pub logprobs: Option<TokenLogprobs>,
    /// Set when the request ended this step.
    pub finish: Option<FinishReason>,
    /// In a request's first output: its prompt tokens reused from the prefix cache (0
    /// without one, or on a miss). `None` in later outputs.
    pub prefix_hit_tokens: Option<usize>,
    /// In a request's first output: the peak predicted by its ticket, when it has one.
    pub predicted_peak_bytes: Option<u64>,
}

struct Sequence<'t> {
    id: RequestId,
    options: GenerateOptions,
    cache: KvCache,
    sampler: Sampler,
    stops: StopMatcher,
    detok: StreamDecoder<'t>,
    history: Vec<u32>,
    generated: usize,
    /// Logits for the next token (after the prompt, or after the last step).
    logits: Vec<f32>,
    /// Prompt tokens reused from the prefix cache, until reported.
    prefix_hit: Option<usize>,
    /// The memory the admission hook reserved, held while the request runs and given
    /// back when it ends.
    ticket: Option<Ticket>,
    /// The output's grammar, when the request has a constraint.
    constraint: Option<SeqConstraint>,
    /// The reasoning budget, when the request has one.
    budget: Option<BudgetState>,
}

/// An admitted request whose prompt is running, chunk by chunk.
struct Prefill {
    id: RequestId,
    prompt: Vec<u32>,
    options: GenerateOptions,
    cache: KvCache,
    /// Prompt tokens in the cache (reused from the prefix cache, or run).
    done: usize,
    /// Prompt tokens reused from the prefix cache; `None` when the prompt takes no
    /// part in prefix reuse.
    reused: Option<usize>,
    /// Whether the cache was seeded from the prefix cache (when the prompt's first
    /// chunk runs, so that it sees what the prompts ahead of it published).
    seeded: bool,
    ticket: Option<Ticket>,
}

/// What the admission hook is asked about a waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdmitQuery {
    /// The request's prompt tokens.
    pub prompt_tokens: usize,
    /// The request's `max_tokens`.
    pub max_tokens: usize,
    /// Sequences running when it would start.
    pub running: usize,
}

/// A request's admission: the memory reserved for it (its KV cache for its planned
/// length and its workspace), and the workspace it keeps once its prompt has run (the
/// rest of the workspace, the prefill's activations, goes back then).
#[derive(Debug)]
pub struct Ticket {
    /// The request's bytes in the ledger.
    pub reservation: Reservation,
    /// The workspace bytes kept for decoding after the prefill.
    pub workspace_after_prefill: u64,
    /// The resident memory predicted for the request when it was admitted (reported
    /// in its first [`StepOutput`]).
    pub predicted_peak_bytes: u64,
}

/// Decides whether a request may start now: `Ok` carries its [`Ticket`] (dropped
/// when the request ends), `Err` leaves it waiting for a later step and says why (the
/// ledger's [`Refusal`], which [`Scheduler::memory_wait`] reports).
pub type AdmitFn<'m> = Box<dyn FnMut(&AdmitQuery) -> std::result::Result<Ticket, Refusal> + 'm>;

/// The batching scheduler over one model. See the module docs.
pub struct Scheduler<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    max_batch: usize,
    waiting: VecDeque<(RequestId, Vec<u32>, GenerateOptions)>,
    prefilling: VecDeque<Prefill>,
    running: Vec<Sequence<'m>>,
    prefill_chunk: usize,
    /// Why the oldest waiting request did not start at the last step, when the
    /// admission hook refused it.
    memory_wait: Option<Refusal>,
    finished: Vec<StepOutput>,
    next_id: RequestId,
    admit_hook: Option<AdmitFn<'m>>,
    prefix: Option<PrefixReuse<'m>>,
    /// The compiled constraints of requests that have not started decoding.
    constraints: HashMap<RequestId, SeqConstraint>,
}

impl std::fmt::Debug for Scheduler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("max_batch", &self.max_batch)
            .field("waiting", &self.waiting.len())
            .field("prefilling", &self.prefilling.len())
            .field("running", &self.running.len())
            .finish()
    }
}

impl<'m> Scheduler<'m> {
    /// A scheduler running at most `max_batch` sequences at once. It keeps no memory
    /// budget of its own: the admission hook ([`Scheduler::set_admission`]) reserves
    /// each request's memory in the runtime's ledger; without one, only `max_batch`
    /// limits it.
    pub fn new(model: &'m Model, tokenizer: &'m Tokenizer, max_batch: usize) -> Self {
        Self {
            model,
            tokenizer,
            max_batch: max_batch.max(1),
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            running: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            memory_wait: None,
            finished: Vec::new(),
            next_id: 0,
            admit_hook: None,
            prefix: None,
            constraints: HashMap::new(),
        }
    }

    /// Asks `hook` before starting each request: the runtime reserves the request's
    /// bytes in its ledger there, or refuses (the request waits for a later step).
    pub fn set_admission(
        &mut self,
        hook: impl FnMut(&AdmitQuery) -> std::result::Result<Ticket, Refusal> + 'm,
    ) {
        self.admit_hook = Some(Box::new(hook));
    }

    /// The most prompt tokens one step runs (at least 1). Default
    /// [`DEFAULT_PREFILL_CHUNK`].
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    /// Reuse prompt prefixes from `prefix` (and publish them there) when admitting
    /// requests. Default: no prefix cache.
    pub fn set_prefix_cache(&mut self, prefix: PrefixReuse<'m>) {
        self.prefix = Some(prefix);
    }

    /// Queues a request; it starts at a later [`Scheduler::step`], when it fits.
    ///
    /// # Errors
    /// [`Error::EmptyPrompt`]; [`Error::InvalidSamplingParam`] for more
    /// [`GenerateOptions::logprobs`] alternatives than [`crate::MAX_TOP_LOGPROBS`].
    pub fn add_request(&mut self, prompt: Vec<u32>, options: GenerateOptions) -> Result<RequestId> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        // Compiled now, so that a bad constraint is this call's error, not a step's.
        let constraint = options
            .constraint
            .as_ref()
            .map(|c| c.start(self.tokenizer))
            .transpose()?;
        if let Some(top) = options.logprobs {
            check_top(top)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Some(c) = constraint {
            self.constraints.insert(id, c);
        }
        self.waiting.push_back((id, prompt, options));
        Ok(id)
    }

    /// Whether any request is waiting, prefilling or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.prefilling.is_empty() || !self.running.is_empty()
    }

    /// Requests decoding now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests admitted whose prompt is still running.
    pub fn prefilling(&self) -> usize {
        self.prefilling.len()
    }

    /// Bytes the admitted requests hold in the ledger (their tickets).
    pub fn reserved_bytes(&self) -> u64 {
        let running = self.running.iter().filter_map(|s| s.ticket.as_ref());
        let prefilling = self.prefilling.iter().filter_map(|p| p.ticket.as_ref());
        running
            .chain(prefilling)
            .map(|t| t.reservation.bytes())
            .sum()
    }

    /// Requests waiting to start.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether request `id` is waiting to start (not admitted yet).
    pub fn is_waiting(&self, id: RequestId) -> bool {
        self.waiting.iter().any(|(w, _, _)| *w == id)
    }

    /// When the oldest waiting request is held back for memory: the ledger's refusal
    /// at the last step. `None` when nothing waits, or the wait is for a batch slot or
    /// for the prompts ahead.
    pub fn memory_wait(&self) -> Option<&Refusal> {
        self.memory_wait.as_ref()
    }

    /// Ends a request now (waiting or running); its output says
    /// [`FinishReason::Cancelled`] at the next step. Returns whether it was found.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|(w, _, _)| *w == id) {
            self.waiting.remove(i);
        } else if let Some(i) = self.prefilling.iter().position(|p| p.id == id) {
            drop(self.prefilling.remove(i));
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            drop(self.running.swap_remove(i));
        } else {
            return false;
        }
        self.constraints.remove(&id);
        self.finished.push(StepOutput {
            id,
            text: String::new(),
            token: None,
            logprobs: None,
            finish: Some(FinishReason::Cancelled),
            prefix_hit_tokens: None,
            predicted_peak_bytes: None,
        });
        true
    }

    /// Admits what fits, runs one prefill chunk, then samples one token for every
    /// running request and runs them all through the model in one batched pass.
    /// Returns each request's output of this step (requests that ended say why; a
    /// request whose prompt is still running has none).
    ///
    /// # Errors
    /// The model's, the sampler's and the tokenizer's errors.
    pub fn step(&mut self) -> Result<Vec<StepOutput>> {
        self.admit()?;
        self.prefill_chunk()?;
        let mut out = std::mem::take(&mut self.finished);
        let mut next = Vec::with_capacity(self.running.len());
        let mut ended = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if let Some(c) = &mut seq.constraint {
                c.apply(&mut seq.logits)?;
            }
            let id = match seq.budget.as_mut().and_then(BudgetState::forced) {
                Some(id) => id,
                None => seq.sampler.sample(&seq.logits, &seq.history)?,
            };
            let mut o = StepOutput {
                id: seq.id,
                text: String::new(),
                token: Some(id),
                logprobs: None,
                finish: None,
                predicted_peak_bytes: seq
                    .prefix_hit
                    .is_some()
                    .then(|| seq.ticket.as_ref().map(|t| t.predicted_peak_bytes))
                    .flatten(),
                prefix_hit_tokens: seq.prefix_hit.take(),
            };
            let eos =
                (!seq.options.ignore_eos || seq.constraint.is_some()) && self.tokenizer.is_eos(id);
            if eos {
                o.finish = Some(FinishReason::Eos);
            } else {
                if let Some(top) = seq.options.logprobs {
                    o.logprobs = Some(token_logprobs(&seq.logits, id, top)?);
                }
                seq.history.push(id);
                seq.generated += 1;
                let piece = seq.detok.step(id)?;
                if let Some(b) = &mut seq.budget {
                    b.observe(&piece);
                }
                let step = seq.stops.push(&piece);
                o.text = step.text;
                let complete = match &mut seq.constraint {
                    Some(c) => c.commit(id)?,
                    None => false,
                };
                if let Some(index) = step.stop {
                    o.finish = Some(FinishReason::Stop(index));
                } else if complete {
                    o.finish = Some(FinishReason::Eos);
                } else if seq.generated >= seq.options.max_tokens {
                    o.finish = Some(FinishReason::Length);
                } else {
                    next.push((i, id));
                }
            }
            if matches!(o.finish, Some(FinishReason::Eos | FinishReason::Length)) {
                let step = seq.stops.push(&seq.detok.finish()?);
                match step.stop {
                    Some(index) => {
                        o.finish = Some(FinishReason::Stop(index));
                        o.text.push_str(&step.text);
                    }
                    None => {
                        o.text.push_str(&step.text);
                        o.text.push_str(&seq.stops.finish());
                    }
                }
            }
            if o.finish.is_some() {
                ended.push(i);
            }
            out.push(o);
        }
        if !next.is_empty() {
            let tokens: Vec<u32> = next.iter().map(|&(_, t)| t).collect();
            let logits = {
                let mut caches: Vec<&mut KvCache> = Vec::with_capacity(next.len());
                let mut constraints = Vec::new();
                let mut j = 0;
                for (i, seq) in self.running.iter_mut().enumerate() {
                    if next.get(j).is_some_and(|&(k, _)| k == i) {
                        caches.push(&mut seq.cache);
                        constraints.extend(seq.constraint.as_mut());
                        j += 1;
                    }
                }
                // The constrained sequences' next masks are computed meanwhile.
                let model = self.model;
                overlap(constraints, || model.forward_batch(&tokens, &mut caches))?
            };
            // Each sequence's row into its own buffer, kept from step to step.
            let vocab = logits.dim(1)?;
            let running = &mut self.running;
            let copied = afo_quant::in_place(&logits, |all: &[f32]| {
                for (&(i, _), row) in next.iter().zip(all.chunks_exact(vocab)) {
                    if let Some(seq) = running.get_mut(i) {
                        seq.logits.clear();
                        seq.logits.extend_from_slice(row);
                    }
                }
            })
            .is_ok();
            if !copied {
                let rows: Vec<Vec<f32>> = logits.to_vec2()?;
                for (&(i, _), row) in next.iter().zip(rows) {
                    self.running[i].logits = row;
                }
            }
        }
        for &i in ended.iter().rev() {
            drop(self.running.swap_remove(i));
        }
        Ok(out)
    }

    /// Starts waiting requests, oldest first, while they fit the batch and the
    /// admission hook grants them memory: each gets its cache and joins the prefill
    /// queue.
    fn admit(&mut self) -> Result<()> {
        self.memory_wait = None;
        while self.running.len() + self.prefilling.len() < self.max_batch {
            let Some((_, prompt, options)) = self.waiting.front() else {
                break;
            };
            let query = AdmitQuery {
                prompt_tokens: prompt.len(),
                max_tokens: options.max_tokens,
                running: self.running.len() + self.prefilling.len(),
            };
            let ticket = match &mut self.admit_hook {
                Some(hook) => match hook(&query) {
                    Ok(t) => Some(t),
                    Err(refusal) => {
                        self.memory_wait = Some(refusal);
                        break;
                    }
                },
                None => None,
            };
            let Some((id, prompt, options)) = self.waiting.pop_front() else {
                break;
            };
            let cache = self.model.new_cache(prompt.len() + options.max_tokens);
            self.prefilling.push_back(Prefill {
                id,
                done: 0,
                reused: None,
                seeded: false,
                prompt,
                options,
                cache,
                ticket,
            });
        }
        Ok(())
    }

    /// Runs up to `prefill_chunk` prompt tokens, oldest prompt first (a short prompt
    /// leaves the rest of the chunk to the next prompts that fit in it whole). A
    /// prompt's cache is seeded from the
    /// prefix cache when its first chunk runs; a prompt that has run in full
    /// publishes its blocks to the prefix cache, gives back its prefill workspace and
    /// starts decoding.
    fn prefill_chunk(&mut self) -> Result<()> {
        let mut budget = self.prefill_chunk;
        while budget > 0 {
            let Some(p) = self.prefilling.front_mut() else {
                return Ok(());
            };
            if !p.seeded {
                p.seeded = true;
                p.reused = seed_from_prefix(&p.prompt, &mut p.cache, self.prefix)?;
                p.done = p.reused.unwrap_or(0);
            }
            // A prompt is split only at multiples of the chunk from where it starts:
            // one that would not fit whole in what is left of this step waits for the
            // next, so a prompt runs in the same chunks whatever arrived beside it (and
            // computes the same logits as it would alone).
            let first_of_step = budget == self.prefill_chunk;
            if !first_of_step && p.prompt.len() - p.done > budget {
                return Ok(());
            }
            let end = (p.done + budget).min(p.prompt.len());
            let chunk = &p.prompt[p.done..end];
            if end < p.prompt.len() {
                // Not the prompt's last chunk: no logits are needed.
                self.model.extend(chunk, &mut p.cache)?;
                p.done = end;
                return Ok(());
            }
            let logits = self.model.decode(chunk, &mut p.cache)?;
            budget -= end - p.done;
            p.done = end;
            self.start_decoding(logits)?;
        }
        Ok(())
    }

    /// Moves the oldest prefilling request, whose prompt has run, to decoding.
    fn start_decoding(&mut self, logits: Vec<f32>) -> Result<()> {
        let Some(mut p) = self.prefilling.pop_front() else {
            return Ok(());
        };
        if let (Some(reused), Some(prefix)) = (p.reused, self.prefix) {
            publish_prefix(&p.prompt, reused, &p.cache, prefix)?;
        }
        if let Some(t) = &mut p.ticket {
            let keep = t.workspace_after_prefill;
            t.reservation.shrink_to(MemoryKind::Workspace, keep);
        }
        let seq = Sequence {
            id: p.id,
            sampler: Sampler::new(p.options.sampling.clone()),
            stops: StopMatcher::new(p.options.stop.iter().cloned())?,
            detok: StreamDecoder::with_prompt(self.tokenizer, &p.prompt, true),
            history: p.prompt,
            generated: 0,
            logits,
            prefix_hit: Some(p.reused.unwrap_or(0)),
            constraint: self.constraints.remove(&p.id),
            budget: crate::generate::budget_state(&p.options, self.tokenizer)?,
            ticket: p.ticket,
            cache: p.cache,
            options: p.options,
        };
        self.running.push(seq);
        Ok(())
    }
}
