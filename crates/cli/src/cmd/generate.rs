//! `afo generate`: stream text from a model, stats on stderr.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
use afo_runtime::guard::ByteSize;
use afo_runtime::{GenerateRequest, Prompt, Runtime};

/// Arguments of `afo generate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The model: a GGUF file, a Hugging Face model folder, or `ORG/NAME` in the
    /// Hugging Face cache.
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    prompt: String,
    /// Continue the prompt as plain text instead of a chat turn.
    #[arg(long)]
    raw: bool,
    /// A system message (chat mode).
    #[arg(long)]
    system: Option<String>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1: none; the default keeps a small model from looping).
    #[arg(long, default_value_t = 1.2)]
    repetition_penalty: f32,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings.
    #[arg(long)]
    stop: Vec<String>,
    /// How the KV cache holds keys and values: f32, f16, bf16 or q8_0 (8.5 bits per
    /// element, 26.6% of f32; memory estimates count the format's bytes).
    #[arg(long, default_value_t = afo_runtime::kvcache::KvFormat::default())]
    kv_cache: afo_runtime::kvcache::KvFormat,
    /// The memory cutline, e.g. 8GiB.
    #[arg(long, default_value = "20GiB")]
    cutline: ByteSize,
    /// Quantize the attention and MLP weights to this scheme while loading (int8,
    /// int4, int4-g32-asym, q8_0, f16, ...; see `afo quantize`).
    #[arg(long)]
    quantize: Option<afo_runtime::quant::QuantScheme>,
    /// Append an SSOT record of the run to this JSONL log.
    #[arg(long)]
    log: Option<PathBuf>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let mut builder = Runtime::builder()
        .cutline(args.cutline)
        .kv_format(args.kv_cache);
    if let Some(log) = &args.log {
        builder = builder.ssot_log(log);
    }
    let runtime = builder.build()?;
    let mut sampling = SamplingParams::builder()
        .temperature(args.temperature)
        .top_k(args.top_k)
        .top_p(args.top_p)
        .min_p(args.min_p)
        .repetition_penalty(args.repetition_penalty);
    if let Some(seed) = args.seed {
        sampling = sampling.seed(seed);
    }
    let prompt = if args.raw {
        Prompt::Text(args.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::system(system.clone()));
        }
        messages.push(Message::user(args.prompt.clone()));
        Prompt::Chat(messages)
    };
    let mut request = GenerateRequest::new(super::resolve_model(&args.model)?, prompt)
        .with_options(GenerateOptions {
            max_tokens: args.max_tokens,
            stop: args.stop.clone(),
            sampling: sampling.build()?,
            ignore_eos: false,
            ..GenerateOptions::default()
        });
    request.scheme = args.quantize;
    // A spinner on a terminal while the model loads and the prompt runs; a plain line
    // when stderr is a file or a pipe.
    let spinner = super::spinner(format!(
        "loading {} and reading the prompt",
        args.model.display()
    ));
    let mut stdout = std::io::stdout().lock();
    let response = runtime.generate_stream(&request, |delta| {
        if !spinner.is_finished() {
            spinner.finish_and_clear();
        }
        if stdout
            .write_all(delta.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    spinner.finish_and_clear();
    writeln!(stdout)?;
    let t = &response.timings;
    eprintln!(
        "\n[{}] load {:.0} ms; {} prompt + {} generated tokens ({}); prefill {:.0} tok/s, \
         decode {} tok/s, time to first token {} ms; peak {} of {} cutline ({}, health {:.0})",
        response.model_id,
        response.acquire_ms,
        response.prompt_tokens,
        response.completion_tokens,
        response.finish.as_openai(),
        t.prefill_tokens_per_s(response.prompt_tokens)
            .unwrap_or(0.0),
        response
            .tokens_per_s
            .map_or("-".into(), |v| format!("{v:.1}")),
        t.ttft_ms.map_or("-".into(), |v| format!("{v:.0}")),
        ByteSize(response.peak_memory_bytes),
        ByteSize(response.cutline_bytes),
        response.badge,
        response.health_score,
    );
    Ok(())
}
