//! Continuous batching: many sequences decoded together, admitted between steps.
//!
//! The engine loop of vLLM: [`Scheduler::add_request`] queues a request,
//! [`Scheduler::step`] admits waiting requests while their KV memory fits the
//! scheduler's budget (running each one's prompt), then runs one decode step for every
//! running sequence as a single batched forward pass ([`Model::forward_batch`]), and
//! [`Scheduler::has_unfinished`] says whether to go on. Each request has its own
//! sampling parameters, stop strings and token budget; each step returns every
//! request's new text, so callers stream; [`Scheduler::cancel`] ends one cleanly.
//!
//! With [`Scheduler::set_prefix_cache`], each admitted request starts from the longest
//! cached prefix of its prompt and publishes its prompt's blocks after its prefill, so
//! a request admitted after another with the same system prompt or history (in the
//! same step too) runs only what differs; see [`crate::generate_with_prefix`].

use std::collections::VecDeque;

use afo_kvcache::KvCache;

use crate::error::{Error, Result};
use crate::generate::{FinishReason, GenerateOptions, PrefixReuse, prefill_with_prefix};
use crate::model::Model;
use crate::sampler::Sampler;
use crate::stream::{StopMatcher, StreamDecoder};
use crate::tokenizer::Tokenizer;

/// A request's id in a [`Scheduler`].
pub type RequestId = u64;

/// What one request produced in one [`Scheduler::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The request.
    pub id: RequestId,
    /// New text (may be empty while a character or a stop string is incomplete).
    pub text: String,
    /// The token sampled this step, if one was.
    pub token: Option<u32>,
    /// Set when the request ended this step.
    pub finish: Option<FinishReason>,
    /// In a request's first output: its prompt tokens reused from the prefix cache (0
    /// without one, or on a miss). `None` in later outputs.
    pub prefix_hit_tokens: Option<usize>,
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
    reserved_bytes: u64,
    /// Prompt tokens reused from the prefix cache, until reported.
    prefix_hit: Option<usize>,
    /// Whatever the admission hook handed out (a memory guard's reservation), held
    /// while the request runs and dropped when it ends.
    _ticket: Option<Box<dyn std::any::Any>>,
}

/// Decides whether a request needing `bytes` of KV memory may start now; `Some` holds
/// whatever it reserved (dropped when the request ends), `None` leaves it waiting.
pub type AdmitFn<'m> = Box<dyn FnMut(u64) -> Option<Box<dyn std::any::Any>> + 'm>;

/// The batching scheduler over one model. See the module docs.
pub struct Scheduler<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    max_batch: usize,
    kv_budget_bytes: u64,
    reserved_bytes: u64,
    waiting: VecDeque<(RequestId, Vec<u32>, GenerateOptions)>,
    running: Vec<Sequence<'m>>,
    finished: Vec<StepOutput>,
    next_id: RequestId,
    admit_hook: Option<AdmitFn<'m>>,
    prefix: Option<PrefixReuse<'m>>,
}

impl std::fmt::Debug for Scheduler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("max_batch", &self.max_batch)
            .field("kv_budget_bytes", &self.kv_budget_bytes)
            .field("reserved_bytes", &self.reserved_bytes)
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .finish()
    }
}

impl<'m> Scheduler<'m> {
    /// A scheduler running at most `max_batch` sequences at once, whose KV caches
    /// together may take at most `kv_budget_bytes` (each request reserves its prompt
    /// plus `max_tokens` when admitted, and gives it back when it ends).
    pub fn new(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        max_batch: usize,
        kv_budget_bytes: u64,
    ) -> Self {
        Self {
            model,
            tokenizer,
            max_batch: max_batch.max(1),
            kv_budget_bytes,
            reserved_bytes: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            admit_hook: None,
            prefix: None,
        }
    }

    /// Asks `hook` before starting each request, after the scheduler's own budget
    /// check: a memory guard reserves the request's bytes there, or says no (the
    /// request waits for a later step).
    pub fn set_admission(&mut self, hook: impl FnMut(u64) -> Option<Box<dyn std::any::Any>> + 'm) {
        self.admit_hook = Some(Box::new(hook));
    }

    /// Reuse prompt prefixes from `prefix` (and publish them there) when admitting
    /// requests. Default: no prefix cache.
    pub fn set_prefix_cache(&mut self, prefix: PrefixReuse<'m>) {
        self.prefix = Some(prefix);
    }

    /// KV bytes one token takes in this model's cache.
    fn bytes_per_token(&self) -> u64 {
        let c = self.model.config();
        (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64
    }

    /// The KV bytes a request reserves: its prompt and `max_tokens`.
    pub fn request_bytes(&self, prompt_tokens: usize, options: &GenerateOptions) -> u64 {
        (prompt_tokens + options.max_tokens) as u64 * self.bytes_per_token()
    }

    /// Queues a request; it starts at a later [`Scheduler::step`], when it fits.
    ///
    /// # Errors
    /// [`Error::EmptyPrompt`]; [`Error::RequestTooLarge`] when the request alone needs
    /// more KV memory than the whole budget (it could never start).
    pub fn add_request(&mut self, prompt: Vec<u32>, options: GenerateOptions) -> Result<RequestId> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let need = self.request_bytes(prompt.len(), &options);
        if need > self.kv_budget_bytes {
            return Err(Error::RequestTooLarge {
                needed_bytes: need,
                budget_bytes: self.kv_budget_bytes,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back((id, prompt, options));
        Ok(id)
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// KV bytes reserved by the running requests.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    /// Ends a request now (waiting or running); its output says
    /// [`FinishReason::Cancelled`] at the next step. Returns whether it was found.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|(w, _, _)| *w == id) {
            self.waiting.remove(i);
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.swap_remove(i);
            self.reserved_bytes -= seq.reserved_bytes;
        } else {
            return false;
        }
        self.finished.push(StepOutput {
            id,
            text: String::new(),
            token: None,
            finish: Some(FinishReason::Cancelled),
            prefix_hit_tokens: None,
        });
        true
    }

    /// Admits what fits, then samples one token for every running request and runs
    /// them all through the model in one batched pass. Returns each request's output
    /// of this step (requests that ended say why).
    ///
    /// # Errors
    /// The model's, the sampler's and the tokenizer's errors.
    pub fn step(&mut self) -> Result<Vec<StepOutput>> {
        self.admit()?;
        let mut out = std::mem::take(&mut self.finished);
        let mut next = Vec::with_capacity(self.running.len());
        let mut ended = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            let id = seq.sampler.sample(&seq.logits, &seq.history)?;
            let mut o = StepOutput {
                id: seq.id,
                text: String::new(),
                token: Some(id),
                finish: None,
                prefix_hit_tokens: seq.prefix_hit.take(),
            };
            if !seq.options.ignore_eos && self.tokenizer.is_eos(id) {
                o.finish = Some(FinishReason::Eos);
            } else {
                seq.history.push(id);
                seq.generated += 1;
                let step = seq.stops.push(&seq.detok.step(id)?);
                o.text = step.text;
                if let Some(index) = step.stop {
                    o.finish = Some(FinishReason::Stop(index));
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
                let mut j = 0;
                for (i, seq) in self.running.iter_mut().enumerate() {
                    if next.get(j).is_some_and(|&(k, _)| k == i) {
                        caches.push(&mut seq.cache);
                        j += 1;
                    }
                }
                self.model.forward_batch(&tokens, &mut caches)?
            };
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            for (&(i, _), row) in next.iter().zip(rows) {
                self.running[i].logits = row;
            }
        }
        for &i in ended.iter().rev() {
            let seq = self.running.swap_remove(i);
            self.reserved_bytes -= seq.reserved_bytes;
        }
        Ok(out)
    }

    /// Starts waiting requests, oldest first, while they fit the batch and the budget.
    fn admit(&mut self) -> Result<()> {
        while self.running.len() < self.max_batch {
            let Some((_, prompt, options)) = self.waiting.front() else {
                break;
            };
            let need = self.request_bytes(prompt.len(), options);
            if self.reserved_bytes + need > self.kv_budget_bytes {
                break;
            }
            let ticket = match &mut self.admit_hook {
                Some(hook) => match hook(need) {
                    Some(t) => Some(t),
                    None => break,
                },
                None => None,
            };
            let Some((id, prompt, options)) = self.waiting.pop_front() else {
                break;
            };
            let mut cache = self.model.new_cache(prompt.len() + options.max_tokens);
            let (logits, reused) =
                prefill_with_prefix(self.model, &prompt, &mut cache, self.prefix)?;
            let seq = Sequence {
                id,
                sampler: Sampler::new(options.sampling.clone()),
                stops: StopMatcher::new(options.stop.iter().cloned())?,
                detok: StreamDecoder::with_prompt(self.tokenizer, &prompt, true),
                history: prompt,
                generated: 0,
                logits,
                reserved_bytes: need,
                prefix_hit: Some(reused),
                _ticket: ticket,
                cache,
                options,
            };
            self.reserved_bytes += need;
            self.running.push(seq);
        }
        Ok(())
    }
}
