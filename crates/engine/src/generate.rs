//! The generation loop: prompt in, sampled tokens and streamed text out.
//!
//! [`generate`] runs a prompt through a [`Decode`] model, samples one token at a time
//! with a [`Sampler`], turns ids into UTF-8-safe text deltas with a [`StreamDecoder`],
//! cuts the text at the first stop string with a [`StopMatcher`], and hands every
//! delta to a callback that may cancel. It stops at an end-of-sequence token, a stop
//! string, `max_tokens`, or cancellation, and reports timings measured on the way.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::error::{Error, Result};
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
    /// Keep generating past end-of-sequence tokens. Default false.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            ignore_eos: false,
        }
    }
}

/// The most prompt tokens [`generate`] runs in one forward pass.
pub const PREFILL_CHUNK: usize = 512;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
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
    /// Why the generation ended.
    pub finish: FinishReason,
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

/// Generates a continuation of `prompt` (token ids) with `model`, calling `on_text`
/// with each text delta as soon as it is safe to show. `on_text` returns
/// [`ControlFlow::Break`] to cancel.
///
/// `state` is the sequence's state; it may already hold a prefix (the prompt then
/// continues it).
///
/// # Errors
/// [`Error::EmptyPrompt`] for an empty prompt, and the model's, sampler's and
/// tokenizer's errors.
pub fn generate<M, F>(
    model: &M,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    state: &mut M::State,
    mut on_text: F,
) -> Result<Generation>
where
    M: Decode + ?Sized,
    F: FnMut(&str) -> ControlFlow<()>,
{
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let start = Instant::now();
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut stops = StopMatcher::new(options.stop.iter().cloned())?;
    let mut detok = StreamDecoder::with_prompt(tokenizer, prompt, true);
    let mut history: Vec<u32> = Vec::with_capacity(prompt.len() + options.max_tokens);
    history.extend_from_slice(prompt);
    let mut text = String::new();
    let mut tokens = Vec::with_capacity(options.max_tokens);
    let mut timings = GenerateTimings::default();

    let mut emit = |delta: &str, text: &mut String| -> ControlFlow<()> {
        if delta.is_empty() {
            return ControlFlow::Continue(());
        }
        text.push_str(delta);
        on_text(delta)
    };

    // The prompt in chunks: the attention scores of one pass are `chunk x context`,
    // not `prompt x prompt`, which bounds prefill memory on long prompts.
    let mut logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        logits = model.decode(chunk, state)?;
    }
    timings.prefill_ms = ms_since(start);
    let mut first_token_at = None;
    let mut finish = FinishReason::Length;

    for i in 0..options.max_tokens {
        let id = sampler.sample(&logits, &history)?;
        if first_token_at.is_none() {
            let now = Instant::now();
            timings.ttft_ms = Some(now.duration_since(start).as_secs_f64() * 1e3);
            first_token_at = Some(now);
        }
        if !options.ignore_eos && tokenizer.is_eos(id) {
            finish = FinishReason::Eos;
            break;
        }
        tokens.push(id);
        history.push(id);
        let step = stops.push(&detok.step(id)?);
        if emit(&step.text, &mut text).is_break() {
            finish = FinishReason::Cancelled;
            break;
        }
        if let Some(index) = step.stop {
            finish = FinishReason::Stop(index);
            break;
        }
        if i + 1 == options.max_tokens {
            break;
        }
        logits = model.decode(&[id], state)?;
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
        finish,
        timings,
    })
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
