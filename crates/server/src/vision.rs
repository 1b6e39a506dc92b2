//! The vision-language path: a request's images preprocessed (bounded decode, smart
//! resize, normalisation) into the encoder's patches, its messages with
//! [`IMAGE_PLACEHOLDER`] where each image part was, and the worker loop that runs a
//! VLM's jobs one at a time (vision encoder, then generation over the language model).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use afo_runtime::Runtime;
use afo_runtime::engine::{
    Decode, FinishReason, Generation, IMAGE_PLACEHOLDER, Message, Tokenizer, VisionInput,
    VisionLanguageModel, generate,
};
use afo_runtime::guard::{KindBytes, MemoryKind, PlanOption, Reservation};
use afo_runtime::image::{DecodeLimits, PreprocessorConfig};
use afo_runtime::kvcache::KvCache;

use crate::error::ApiError;
use crate::openai::{ChatMessage, PromptInput};
use crate::state::{Config, Shared};
use crate::worker::{Active, Cancel, Done, Event, Job, ended, finish};

/// The most pixels (width or height) an image may declare.
pub(crate) const MAX_IMAGE_SIDE: u32 = 8192;
/// The most bytes an image's decoded buffer may take.
pub(crate) const MAX_DECODED_BYTES: u64 = 256 << 20;

/// A VLM's conversation with its images, ready for `prepare_chat` in the worker.
#[derive(Debug)]
pub(crate) struct VisionJob {
    /// The messages, [`IMAGE_PLACEHOLDER`] where each image goes.
    pub messages: Vec<Message>,
    /// The preprocessed images, in order.
    pub images: Vec<VisionInput>,
}

/// A request planned for a VLM: the prompt's token count (image tokens included),
/// the token budget, the predicted bytes, and what the worker runs.
#[derive(Debug)]
pub(crate) struct Planned {
    /// Text-only prompt tokens (`/v1/completions`); empty for a chat, whose tokens
    /// the worker prepares.
    pub prompt: Vec<u32>,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// What the run reserves when admitted, by the runtime's estimator.
    pub parts: KindBytes,
    /// The decoded images' bytes, held in the ledger while the request waits.
    pub held: Option<Reservation>,
    pub vision: Option<VisionJob>,
    pub image_pixels: u64,
    pub original_pixels: u64,
}

/// The decode limits of a request's images.
fn decode_limits(max_image_bytes: usize) -> DecodeLimits {
    let mut limits = DecodeLimits::default();
    limits.max_input_bytes = max_image_bytes as u64;
    limits.max_width = MAX_IMAGE_SIDE;
    limits.max_height = MAX_IMAGE_SIDE;
    limits.max_alloc_bytes = MAX_DECODED_BYTES;
    limits
}

/// `message`'s text with [`IMAGE_PLACEHOLDER`] where each of its images stood.
fn with_placeholders(message: &ChatMessage) -> String {
    let mut text = String::with_capacity(message.text.len() + 48 * message.images.len());
    let mut at = 0usize;
    for &offset in &message.image_offsets {
        let offset = offset.clamp(at, message.text.len());
        text.push_str(message.text.get(at..offset).unwrap_or_default());
        text.push_str(IMAGE_PLACEHOLDER);
        at = offset;
    }
    text.push_str(message.text.get(at..).unwrap_or_default());
    text
}

/// Preprocesses the images of `prompt`, counts its tokens and predicts its bytes.
/// Blocking (image decoding and resizing): call it off the async threads.
///
/// # Errors
/// 400 naming the image that could not be decoded or is too large, or a prompt
/// that does not fit the context.
pub(crate) fn plan(
    runtime: &Runtime,
    vlm: &VisionLanguageModel,
    pre: &PreprocessorConfig,
    model_id: &str,
    prompt: &PromptInput,
    max_tokens: Option<usize>,
    config: &Config,
) -> Result<Planned, ApiError> {
    let limits = decode_limits(config.limits.max_image_bytes);
    let mut images = Vec::new();
    let (mut pixels, mut image_pixels, mut original_pixels) = (Vec::new(), 0u64, 0u64);
    let mut image_tokens = 0usize;
    let mut patches = 0usize;
    for (n, image) in prompt.images().enumerate() {
        let fail = |e: afo_runtime::image::Error| {
            let too_large = matches!(
                e,
                afo_runtime::image::Error::InputTooLarge { .. }
                    | afo_runtime::image::Error::DimensionsTooLarge { .. }
                    | afo_runtime::image::Error::AllocationTooLarge { .. }
            );
            ApiError::invalid(format!(
                "image {} ({}) could not be used: {e}",
                n + 1,
                image.part
            ))
            .param(format!("{}.image_url.url", image.part))
            .code(if too_large {
                "image_too_large"
            } else {
                "invalid_image"
            })
        };
        let prepared = afo_runtime::image::prepare(&image.bytes, pre, &limits).map_err(fail)?;
        let p = prepared.to_preprocessed(pre).map_err(fail)?;
        image_tokens += p.num_image_tokens();
        patches += p.grid_thw.iter().product::<usize>();
        pixels.push(p.image_pixels);
        image_pixels += p.image_pixels;
        original_pixels += p.original_pixels;
        images.push(VisionInput {
            pixel_values: p.pixel_values,
            grid_thw: p.grid_thw,
        });
    }
    let encode_err = |e| ApiError::invalid(format!("the prompt could not be encoded: {e}"));
    let (tokens, vision) = match prompt {
        PromptInput::Text(t) => (vlm.tokenizer().encode(t, true).map_err(encode_err)?, None),
        PromptInput::Chat(messages) => {
            let messages: Vec<Message> = messages
                .iter()
                .map(|m| Message::new(m.role.clone(), with_placeholders(m)))
                .collect();
            let raw = vlm.encode_chat(&messages).map_err(encode_err)?;
            let image_id = vlm.config().image_token_id;
            let found = raw.iter().filter(|&&t| t == image_id).count();
            if found != images.len() {
                return Err(ApiError::invalid(format!(
                    "the messages hold {found} image tokens for {} images: the text may not contain `<|image_pad|>`",
                    images.len()
                ))
                .param("messages"));
            }
            let count = raw.len() - found + image_tokens;
            (
                vec![0; count],
                Some(VisionJob {
                    messages,
                    images: std::mem::take(&mut images),
                }),
            )
        }
    };
    let prompt_tokens = tokens.len();
    if prompt_tokens == 0 {
        return Err(ApiError::invalid("the prompt encodes to no tokens"));
    }
    let context = vlm.config().text.max_position;
    if prompt_tokens >= context {
        return Err(ApiError::invalid(format!(
            "the prompt has {prompt_tokens} tokens ({image_tokens} of them for images); model `{model_id}` takes at most {context} in all"
        ))
        .code("context_length_exceeded"));
    }
    let max_tokens = max_tokens
        .unwrap_or(config.default_max_tokens)
        .min(context - prompt_tokens);
    let estimate = runtime.estimate_vision(vlm, prompt_tokens, max_tokens, pixels, patches);
    let held_bytes: u64 = vision
        .iter()
        .flat_map(|v| v.images.iter())
        .map(|i| (i.pixel_values.elem_count() * i.pixel_values.dtype().size_in_bytes()) as u64)
        .sum();
    Ok(Planned {
        prompt: if vision.is_some() { Vec::new() } else { tokens },
        prompt_tokens,
        max_tokens,
        parts: estimate.parts,
        held: (held_bytes > 0).then(|| runtime.hold(MemoryKind::Images, held_bytes)),
        vision,
        image_pixels,
        original_pixels,
    })
}

/// How a VLM job ended short of a finish reason.
enum Stopped {
    Cancelled(Cancel),
    Failed(ApiError),
}

/// The worker loop of a VLM: one job at a time, admitted by the memory guard,
/// prepared (vision encoder) and generated with streaming, cancelled when its
/// client goes away or its time runs out.
pub(crate) fn run(
    shared: &Arc<crate::state::Shared>,
    model_id: &str,
    vlm: &VisionLanguageModel,
    rx: &Receiver<Job>,
    idle: &crate::worker::Idle,
    queued: &AtomicUsize,
    running: &AtomicUsize,
) {
    let bytes_per_token = vlm.text_model().kv_bytes_per_token();
    while let Some(job) = idle.next(rx) {
        let mut a = Active::new(job);
        let result = run_one(shared, model_id, vlm, &mut a, running);
        running.store(0, Ordering::SeqCst);
        queued.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(reason) => {
                finish(shared, model_id, &a, Some(reason), None, bytes_per_token);
                let _ = a.job.events.send(Event::Done(Done {
                    finish: reason,
                    prompt_tokens: a.job.prompt.len(),
                    completion_tokens: a.completion_tokens,
                }));
            }
            Err(Stopped::Cancelled(why)) => {
                a.cancel = Some(why);
                ended(shared, model_id, &a, bytes_per_token);
            }
            Err(Stopped::Failed(err)) => {
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
    }
    tracing::debug!(model = model_id, "vision worker stopped");
}

fn run_one(
    shared: &Shared,
    model_id: &str,
    vlm: &VisionLanguageModel,
    a: &mut Active,
    running: &AtomicUsize,
) -> Result<FinishReason, Stopped> {
    let runtime = &shared.runtime;
    let aborting = || shared.aborting();
    // Admission: the run's bytes reserved in the runtime's ledger, held until the job
    // ends.
    let plan = [PlanOption::new("as asked", a.job.parts)];
    let mut refused = None;
    let _reservation = loop {
        if aborting() {
            return Err(Stopped::Cancelled(Cancel::Shutdown));
        }
        if a.job.events.is_closed() {
            return Err(Stopped::Cancelled(Cancel::Client));
        }
        let now = Instant::now();
        if now >= a.job.deadline {
            return Err(Stopped::Cancelled(Cancel::Deadline));
        }
        if now >= a.job.admit_by {
            // Held back by the ledger, or (never tried) by the jobs ahead of it.
            return Err(Stopped::Cancelled(Cancel::queued(refused)));
        }
        match runtime.admit(&plan) {
            Ok(admitted) => {
                a.predicted_peak = Some(admitted.predicted_peak_bytes);
                break admitted.reservation;
            }
            Err((refusal, _)) => {
                refused = Some(refusal);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    running.store(1, Ordering::SeqCst);
    let failed = |e: afo_runtime::engine::Error| {
        Stopped::Failed(ApiError::internal(format!(
            "generation failed on model `{model_id}`: {e}"
        )))
    };
    let generation = match a.job.vision.take() {
        Some(v) => {
            let prompt = vlm.prepare_chat(&v.messages, &v.images).map_err(|e| {
                Stopped::Failed(ApiError::invalid(format!(
                    "the images and messages could not be prepared for model `{model_id}`: {e}"
                )))
            })?;
            drop(v);
            // The pixels are encoded: their hold goes back.
            a.job.held.take();
            a.job.prompt.clone_from(&prompt.tokens);
            let decoder = vlm.decoder(&prompt);
            stream(
                shared,
                &decoder,
                vlm.text_model(),
                vlm.tokenizer(),
                &prompt.tokens,
                a,
            )
            .map_err(failed)?
        }
        None => {
            let prompt = std::mem::take(&mut a.job.prompt);
            let g = stream(
                shared,
                vlm.text_model(),
                vlm.text_model(),
                vlm.tokenizer(),
                &prompt,
                a,
            );
            a.job.prompt = prompt;
            g.map_err(failed)?
        }
    };
    a.completion_tokens = generation.tokens.len();
    if generation.finish == FinishReason::Cancelled {
        return Err(Stopped::Cancelled(a.cancel.unwrap_or(Cancel::Client)));
    }
    if !a.started {
        a.started = true;
        let _ = a.job.events.send(Event::Started);
    }
    Ok(generation.finish)
}

/// Generates `prompt` with `model`, sending each text delta to the job's channel;
/// stops when the client went away, the deadline passed or the server is aborting
/// (`a.cancel` says which).
fn stream<M: Decode<State = KvCache> + ?Sized>(
    shared: &Shared,
    model: &M,
    text: &afo_runtime::engine::Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    a: &mut Active,
) -> afo_runtime::engine::Result<Generation> {
    let runtime = &shared.runtime;
    let started = Instant::now();
    let mut cache = text.new_cache(prompt.len() + a.job.options.max_tokens);
    let mut deltas = 0usize;
    let events = a.job.events.clone();
    let deadline = a.job.deadline;
    let (mut cancel, mut sent_start, mut peak) = (None, a.started, a.peak_bytes);
    let mut first_text = None;
    let result = generate(
        model,
        tokenizer,
        prompt,
        &a.job.options,
        &mut cache,
        |text| {
            if !sent_start {
                sent_start = true;
                first_text = Some(Instant::now());
                let _ = events.send(Event::Started);
            }
            if deltas.is_multiple_of(16) {
                peak = peak.max(runtime.memory().rss);
            }
            deltas += 1;
            if events.is_closed() {
                cancel = Some(Cancel::Client);
                return ControlFlow::Break(());
            }
            if Instant::now() >= deadline {
                cancel = Some(Cancel::Deadline);
                return ControlFlow::Break(());
            }
            if shared.aborting() {
                cancel = Some(Cancel::Shutdown);
                return ControlFlow::Break(());
            }
            let _ = events.send(Event::Text(text.to_owned()));
            ControlFlow::Continue(())
        },
    );
    let end = Instant::now();
    a.started = sent_start;
    a.cancel = cancel;
    a.peak_bytes = peak.max(runtime.memory().rss);
    if let Ok(g) = &result {
        a.first_token = g
            .timings
            .ttft_ms
            .map(|ms| started + Duration::from_secs_f64(ms / 1e3))
            .or(first_text);
        a.last_token = Some(end);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str, offsets: &[usize]) -> ChatMessage {
        ChatMessage {
            role: "user".to_owned(),
            text: text.to_owned(),
            images: Vec::new(),
            image_offsets: offsets.to_vec(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    #[test]
    fn placeholders_go_where_the_image_parts_were() {
        let p = IMAGE_PLACEHOLDER;
        assert_eq!(with_placeholders(&message("ab", &[])), "ab");
        assert_eq!(with_placeholders(&message("", &[0])), p);
        assert_eq!(
            with_placeholders(&message("a\nb", &[0, 1, 3])),
            format!("{p}a{p}\nb{p}")
        );
        // An offset past the text (never produced by the parser) lands at the end.
        assert_eq!(with_placeholders(&message("a", &[9])), format!("a{p}"));
    }
}
