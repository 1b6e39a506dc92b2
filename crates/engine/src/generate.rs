//! The generation loop: prompt in, sampled tokens and streamed text out.
//!
//! [`generate`] runs a prompt through a [`Decode`] model, samples one token at a time
//! with a [`Sampler`], turns ids into UTF-8-safe text deltas with a [`StreamDecoder`],
//! cuts the text at the first stop string with a [`StopMatcher`], and hands every
//! delta to a callback that may cancel. It stops at an end-of-sequence token, a stop
//! string, `max_tokens`, or cancellation, and reports timings measured on the way.
//!
//! [`generate_with_prefix`] does the same with a [`PrefixCache`]: the longest cached
//! block-aligned prefix of the prompt seeds the sequence's KV cache, only the rest of
//! the prompt runs through the model, and the prompt's new full blocks are published
//! for the next request. The output equals a run without the prefix cache: the cached
//! keys and values are the ones the same model computed for the same tokens at the same
//! positions (up to float rounding between prefill chunks of different sizes, far
//! below what changes a sampled token in practice; the tests check it on SmolLM2).
//!
//! ## Prefix reuse and pruning
//!
//! The prefix cache is used only where pruning cannot make the two runs differ: a
//! sequence cache with a token budget looks up a prefix only when the budget holds the
//! whole prompt (the prefill then never prunes) and its policy does not rank tokens by
//! the attention they received (a seeded prefix has received none from the prompt's
//! own queries, so heavy hitters would be chosen differently). A cache that pruned
//! during the prefill publishes nothing: its slots no longer hold positions `0..len`.

use std::ops::ControlFlow;
use std::time::Instant;

use afo_kvcache::{KvCache, PrefixCache, Salt};

use crate::constraint::{Constraint, overlap};
use crate::error::{Error, Result};
use crate::logprobs::{TokenLogprobs, check_top, token_logprobs};
use crate::model::Model;
use crate::reasoning::{BudgetState, ReasoningBudget};
use crate::sampler::{Sampler, SamplingParams};
use crate::stream::{StopMatcher, StreamDecoder};
use crate::tokenizer::Tokenizer;

/// What the generation loop needs from a model: run tokens, get next-token logits.
pub trait Decode {
    /// The per-sequence state (the KV cache).
    type State;

    /// A fresh state for a new sequence.
    fn new_state(&self) -> Self::State;

    /// Runs `tokens` after what `state` already holds, appends them to it, and returns
    /// the logits of the last position (one per vocabulary entry).
    ///
    /// # Errors
    /// When the forward pass fails (for example the context is full).
    fn decode(&self, tokens: &[u32], state: &mut Self::State) -> Result<Vec<f32>>;

    /// Runs `tokens` after what `state` holds and appends them to it, without the
    /// logits: a prompt's chunk before its last one. The state afterwards is what
    /// [`Decode::decode`] leaves; a model that can skip the work the logits alone
    /// need (the last layer past its attention, the LM head) does.
    ///
    /// # Errors
    /// As [`Decode::decode`].
    fn extend(&self, tokens: &[u32], state: &mut Self::State) -> Result<()> {
        self.decode(tokens, state).map(|_| ())
    }
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The most tokens to generate. Default 256.
    pub max_tokens: usize,
    /// Stop strings: the text ends before the first one that appears. Default none.
    pub stop: Vec<String>,
    /// Sampling parameters. Default: [`SamplingParams::default`].
    pub sampling: SamplingParams,
    /// Keep generating past end-of-sequence tokens. Default false. With a
    /// [`constraint`](Self::constraint) the grammar decides: end-of-sequence is
    /// allowed only where the grammar may end, and then ends the generation.
    pub ignore_eos: bool,
    /// What the output must be (a JSON schema, a Lark grammar, a regex): tokens it
    /// does not allow are never sampled, and the generation ends when it is
    /// complete. Default none. See [`Constraint`].
    pub constraint: Option<Constraint>,
    /// A cap on the tokens of the output's `<think>` block: once spent, the block is
    /// closed and the answer begins. Default none. See [`ReasoningBudget`].
    pub reasoning_budget: Option<ReasoningBudget>,
    /// Log-probabilities to report for each generated token: `None` computes none
    /// (no cost); `Some(k)` reports the token's own and the `k` most likely tokens'
    /// (`k` at most [`crate::MAX_TOP_LOGPROBS`]), under the model's raw distribution
    /// (see [`crate::token_logprobs`]). Default `None`.
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            ignore_eos: false,
            constraint: None,
            reasoning_budget: None,
            logprobs: None,
        }
    }
}

/// The most prompt tokens [`generate`] runs in one forward pass.
pub const PREFILL_CHUNK: usize = 512;

/// The reasoning budget a generation follows: none with a constraint (the grammar
/// decides every token).
pub(crate) fn budget_state(
    options: &GenerateOptions,
    tokenizer: &Tokenizer,
) -> Result<Option<BudgetState>> {
    match options.reasoning_budget {
        Some(b) if options.constraint.is_none() => BudgetState::new(b, tokenizer).map(Some),
        _ => Ok(None),
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token, or the output's
    /// [`Constraint`] was complete with nothing more allowed.
    Eos,
    /// A stop string appeared; the index is into [`GenerateOptions::stop`].
    Stop(usize),
    /// `max_tokens` were generated.
    Length,
    /// The caller cancelled.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI `finish_reason`: `stop` (end-of-sequence or a stop string),
    /// `length`, or `cancelled`.
    pub const fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Timings of one generation, measured with a monotonic clock.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateTimings {
    /// Time to run the prompt through the model, in milliseconds.
    pub prefill_ms: f64,
    /// Time from the start of the call to the first sampled token, in milliseconds.
    pub ttft_ms: Option<f64>,
    /// Time spent after the first token, in milliseconds.
    pub decode_ms: f64,
    /// Total wall time of the call, in milliseconds.
    pub total_ms: f64,
}

impl GenerateTimings {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_s(&self, prompt_tokens: usize) -> Option<f64> {
        (self.prefill_ms > 0.0).then(|| prompt_tokens as f64 / (self.prefill_ms / 1e3))
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text, cut before any stop string.
    pub text: String,
    /// The generated token ids (without a final end-of-sequence token).
    pub tokens: Vec<u32>,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from a prefix cache instead of the
    /// forward pass (0 without one).
    pub prefix_hit_tokens: usize,
    /// Why the generation ended.
    pub finish: FinishReason,
    /// With [`GenerateOptions::logprobs`], one entry per token of
    /// [`Generation::tokens`], in order; empty otherwise.
    pub logprobs: Vec<TokenLogprobs>,
    /// What it cost.
    pub timings: GenerateTimings,
}

impl Generation {
    /// Generated tokens per second over the decode phase (the tokens after the first,
    /// over the time after the first); `None` with fewer than two tokens.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        let n = self.tokens.len();
        (n >= 2 && self.timings.decode_ms > 0.0)
            .then(|| (n - 1) as f64 / (self.timings.decode_ms / 1e3))
    }
}

/// A prefix cache to reuse prompt prefixes from and publish them to, and the salt that
/// keys the model's (and the prompt's non-token inputs') blocks.
#[derive(Debug, Clone, Copy)]
pub struct PrefixReuse<'a> {
    /// The cache (one per loaded model).
    pub cache: &'a PrefixCache,
    /// The model's id and weight scheme, mixed with the prompt's images if any.
    pub salt: Salt,
}

/// Generates a continuation of `prompt` (token ids) with `model`, calling `on_text`
/// with each text delta as soon as it is safe to show. `on_text` returns
/// [`ControlFlow::Break`] to cancel.
///
/// `state` is the sequence's state; it may already hold a prefix (the prompt then
/// continues it).
///
/// # Errors
/// [`Error::EmptyPrompt`] for an empty prompt, [`Error::Constraint`] for a
/// constraint that does not compile (or fails), and the model's, sampler's and
/// tokenizer's errors.
pub fn generate<M, F>(
    model: &M,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    state: &mut M::State,
    on_text: F,
) -> Result<Generation>
where
    M: Decode + ?Sized,
    F: FnMut(&str) -> ControlFlow<()>,
{
    run(
        model,
        tokenizer,
        prompt,
        options,
        state,
        |model, state| Ok((prefill_chunks(model, prompt, state)?, 0)),
        on_text,
    )
}

/// [`generate`] with a prefix cache: the longest cached prefix of `prompt` seeds
/// `cache`, the rest of the prompt runs through the model, and the prompt's new full
/// blocks are published after the prefill (see the module docs for when pruning
/// turns this off). [`Generation::prefix_hit_tokens`] says how many prompt tokens were
/// reused; the time to first token counts the lookup and the seeding.
///
/// `cache` must be empty; a cache that already holds tokens runs without the prefix
/// cache.
///
/// # Errors
/// As [`generate`], and the prefix cache's errors (a block that does not fit the
/// model's cache).
pub fn generate_with_prefix<F>(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    cache: &mut KvCache,
    prefix: PrefixReuse<'_>,
    on_text: F,
) -> Result<Generation>
where
    F: FnMut(&str) -> ControlFlow<()>,
{
    run(
        model,
        tokenizer,
        prompt,
        options,
        cache,
        |model, cache| prefill_with_prefix(model, prompt, cache, Some(prefix)),
        on_text,
    )
}

/// Runs `prompt` in chunks of [`PREFILL_CHUNK`] and returns the last logits: the
/// attention scores of one pass are `chunk x context`, not `prompt x prompt`, which
/// bounds prefill memory on long prompts.
fn prefill_chunks<M: Decode + ?Sized>(
    model: &M,
    prompt: &[u32],
    state: &mut M::State,
) -> Result<Vec<f32>> {
    let mut chunks = prompt.chunks(PREFILL_CHUNK);
    let Some(last) = chunks.next_back() else {
        return Ok(Vec::new());
    };
    // Only the last chunk's logits are used.
    for chunk in chunks {
        model.extend(chunk, state)?;
    }
    model.decode(last, state)
}

/// Whether a prefix may seed `cache` for `prompt_tokens` without changing what the
/// run computes (see the module docs).
fn may_reuse(cache: &KvCache, prompt_tokens: usize) -> bool {
    let c = cache.config();
    cache.is_empty()
        && cache.position() == 0
        && c.budget_tokens.is_none_or(|b| b >= prompt_tokens)
        && !(c.budget_tokens.is_some() && c.policy.needs_attention())
}

/// The prefill of one sequence with an optional prefix cache: seeds `cache` with the
/// longest cached prefix, runs the rest of `prompt`, publishes its new full blocks.
/// Returns the last logits and the prompt tokens reused.
pub(crate) fn prefill_with_prefix(
    model: &Model,
    prompt: &[u32],
    cache: &mut KvCache,
    prefix: Option<PrefixReuse<'_>>,
) -> Result<(Vec<f32>, usize)> {
    let reused = seed_from_prefix(prompt, cache, prefix)?;
    let logits = prefill_chunks(model, &prompt[reused.unwrap_or(0)..], cache)?;
    if let (Some(reused), Some(p)) = (reused, prefix) {
        publish_prefix(prompt, reused, cache, p)?;
    }
    Ok((logits, reused.unwrap_or(0)))
}

/// Seeds an empty `cache` with the longest cached prefix of `prompt` (never all of
/// it: the last token runs, its logits are the first token's). Returns the prompt
/// tokens reused, or `None` when the prompt does not take part in prefix reuse (no
/// prefix cache, or reuse would change what the run computes): then it publishes
/// nothing either.
///
/// # Errors
/// [`Error::EmptyPrompt`]; the prefix cache's errors.
pub(crate) fn seed_from_prefix(
    prompt: &[u32],
    cache: &mut KvCache,
    prefix: Option<PrefixReuse<'_>>,
) -> Result<Option<usize>> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let Some(p) = prefix.filter(|_| may_reuse(cache, prompt.len())) else {
        return Ok(None);
    };
    let hit = p.cache.lookup(p.salt, &prompt[..prompt.len() - 1]);
    if !hit.is_empty() {
        hit.seed(cache)?;
    }
    Ok(Some(hit.tokens()))
}

/// Publishes the full blocks of a prompt that has run into `cache` (after
/// [`seed_from_prefix`] reused `reused` tokens of it).
///
/// # Errors
/// The prefix cache's errors.
pub(crate) fn publish_prefix(
    prompt: &[u32],
    reused: usize,
    cache: &KvCache,
    p: PrefixReuse<'_>,
) -> Result<()> {
    let added = p.cache.insert(p.salt, prompt, cache)?;
    tracing::debug!(
        prompt = prompt.len(),
        reused,
        published_blocks = added,
        "prefill with prefix cache"
    );
    Ok(())
}

/// The generation loop, after `prefill` has run the prompt into `state` (returning the
/// last logits and the prompt tokens reused from a prefix cache).
fn run<M, P, F>(
    model: &M,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    state: &mut M::State,
    prefill: P,
    mut on_text: F,
) -> Result<Generation>
where
    M: Decode + ?Sized,
    P: FnOnce(&M, &mut M::State) -> Result<(Vec<f32>, usize)>,
    F: FnMut(&str) -> ControlFlow<()>,
{
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if let Some(top) = options.logprobs {
        check_top(top)?;
    }
    let start = Instant::now();
    let mut constraint = options
        .constraint
        .as_ref()
        .map(|c| c.start(tokenizer))
        .transpose()?;
    let mut budget = budget_state(options, tokenizer)?;
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut stops = StopMatcher::new(options.stop.iter().cloned())?;
    let mut detok = StreamDecoder::with_prompt(tokenizer, prompt, true);
    let mut history: Vec<u32> = Vec::with_capacity(prompt.len() + options.max_tokens);
    history.extend_from_slice(prompt);
    let mut text = String::new();
    let mut tokens = Vec::with_capacity(options.max_tokens);
    let mut logprobs = Vec::new();
    let mut timings = GenerateTimings::default();

    let mut emit = |delta: &str, text: &mut String| -> ControlFlow<()> {
        if delta.is_empty() {
            return ControlFlow::Continue(());
        }
        text.push_str(delta);
        on_text(delta)
    };

    // The first mask is computed while the prompt runs.
    let (mut logits, prefix_hit_tokens) =
        overlap(constraint.iter_mut().collect(), || prefill(model, state))?;
    timings.prefill_ms = ms_since(start);
    let mut first_token_at = None;
    let mut finish = FinishReason::Length;

    for i in 0..options.max_tokens {
        if let Some(c) = &mut constraint {
            c.apply(&mut logits)?;
        }
        let id = match budget.as_mut().and_then(BudgetState::forced) {
            Some(id) => id,
            None => sampler.sample(&logits, &history)?,
        };
        if first_token_at.is_none() {
            let now = Instant::now();
            timings.ttft_ms = Some(now.duration_since(start).as_secs_f64() * 1e3);
            first_token_at = Some(now);
        }
        if (!options.ignore_eos || constraint.is_some()) && tokenizer.is_eos(id) {
            finish = FinishReason::Eos;
            break;
        }
        let complete = match &mut constraint {
            Some(c) => c.commit(id)?,
            None => false,
        };
        if let Some(top) = options.logprobs {
            logprobs.push(token_logprobs(&logits, id, top)?);
        }
        tokens.push(id);
        history.push(id);
        let piece = detok.step(id)?;
        if let Some(b) = &mut budget {
            b.observe(&piece);
        }
        let step = stops.push(&piece);
        if emit(&step.text, &mut text).is_break() {
            finish = FinishReason::Cancelled;
            break;
        }
        if let Some(index) = step.stop {
            finish = FinishReason::Stop(index);
            break;
        }
        if complete {
            finish = FinishReason::Eos;
            break;
        }
        if i + 1 == options.max_tokens {
            break;
        }
        // The next mask is computed while the token runs through the model.
        logits = overlap(constraint.iter_mut().collect(), || {
            model.decode(&[id], state)
        })?;
    }

    if matches!(finish, FinishReason::Eos | FinishReason::Length) {
        let step = stops.push(&detok.finish()?);
        let tail = match step.stop {
            Some(index) => {
                finish = FinishReason::Stop(index);
                step.text
            }
            None => step.text + &stops.finish(),
        };
        if emit(&tail, &mut text).is_break() {
            finish = FinishReason::Cancelled;
        }
    }

    let end = Instant::now();
    timings.total_ms = end.duration_since(start).as_secs_f64() * 1e3;
    timings.decode_ms = first_token_at.map_or(0.0, |t| end.duration_since(t).as_secs_f64() * 1e3);
    Ok(Generation {
        text,
        tokens,
        prompt_tokens: prompt.len(),
        prefix_hit_tokens,
        finish,
        logprobs,
        timings,
    })
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
