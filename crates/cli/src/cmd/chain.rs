//! `afo chain`: images analysed by a vision-language model, then summarised by a text
//! model; per-stage timings, image sizes and memory on stdout.

use std::path::PathBuf;

use afo_runtime::engine::{SamplingParams, TinyVlm, VisionLanguageModel};
use afo_runtime::guard::ByteSize;
use afo_runtime::{ChainImage, ChainRequest, Runtime};

/// The image used when none is given: a small synthetic landscape shipped with afo.
pub(crate) const SAMPLE_JPEG: &[u8] = include_bytes!("../../assets/sample.jpg");

/// Arguments of `afo chain`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The vision-language model: a Qwen3-VL Hugging Face folder (config.json,
    /// safetensors, tokenizer.json, preprocessor_config.json). Default: a tiny test
    /// model with random weights, written to a temporary folder (its text is noise).
    #[arg(long)]
    vlm: Option<PathBuf>,
    /// The summary model (GGUF file or folder). Default: the VLM's own language model,
    /// on the same loaded instance.
    #[arg(long)]
    llm: Option<PathBuf>,
    /// What to ask about the images.
    #[arg(long, default_value = "Describe the image in detail.")]
    instruction: String,
    /// What to ask the summary model (the analysis follows it).
    #[arg(long, default_value = afo_runtime::DEFAULT_SUMMARY_PROMPT)]
    summary_prompt: String,
    /// The most tokens of the analysis.
    #[arg(long, default_value_t = 128)]
    analysis_tokens: usize,
    /// The most tokens of the summary.
    #[arg(long, default_value_t = 96)]
    summary_tokens: usize,
    /// Repetition penalty of both stages (1: none; the default keeps small models
    /// from looping).
    #[arg(long, default_value_t = 1.2)]
    repetition_penalty: f32,
    /// How the KV cache holds keys and values: f32, f16, bf16 or q8_0 (8.5 bits per
    /// element, 26.6% of f32; memory estimates count the format's bytes).
    #[arg(long, default_value_t = afo_runtime::kvcache::KvFormat::default())]
    kv_cache: afo_runtime::kvcache::KvFormat,
    /// The memory cutline, e.g. 8GiB.
    #[arg(long, default_value = "20GiB")]
    cutline: ByteSize,
    /// Append the run's SSOT record to this JSONL log.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Images (JPEG, PNG, WebP, GIF, BMP). Default: a small shipped test image.
    images: Vec<PathBuf>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let mut images = Vec::new();
    if args.images.is_empty() {
        out!("image: no image given, using the shipped test image (480x320 JPEG)");
        images.push(ChainImage {
            name: "sample.jpg".into(),
            bytes: SAMPLE_JPEG.to_vec(),
        });
    }
    for path in &args.images {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        images.push(ChainImage {
            name: path.display().to_string(),
            bytes,
        });
    }
    let vlm = match &args.vlm {
        Some(dir) => {
            let dir = super::resolve_model(dir)?;
            if !VisionLanguageModel::is_vlm_dir(&dir) {
                anyhow::bail!(
                    "{}: not a vision-language model folder this build runs (Qwen3-VL)",
                    dir.display()
                );
            }
            dir
        }
        None => {
            let tiny = TinyVlm::default();
            let dir = std::env::temp_dir().join(format!("afo-tiny-vlm-{}", tiny.seed));
            if !dir.join("config.json").is_file() {
                // Written beside it and renamed into place, so that two processes
                // starting at once never read a half-written folder.
                let part = std::env::temp_dir().join(format!(
                    "afo-tiny-vlm-{}.{}",
                    tiny.seed,
                    std::process::id()
                ));
                tiny.write(&part)?;
                if std::fs::rename(&part, &dir).is_err() {
                    // Another process put it there first.
                    std::fs::remove_dir_all(&part)?;
                }
            }
            out!(
                "vlm: none given, using the built-in tiny test VLM (random weights: its \
                 analysis is noise) at {}",
                dir.display()
            );
            dir
        }
    };
    let llm = args.llm.as_deref().map(super::resolve_model).transpose()?;
    let mut builder = Runtime::builder()
        .cutline(args.cutline)
        .kv_format(args.kv_cache);
    if let Some(log) = &args.log {
        builder = builder.ssot_log(log);
    }
    let runtime = builder.build()?;
    let mut request = ChainRequest::new(&vlm, images, &args.instruction);
    request.llm = llm;
    request.summary_prompt.clone_from(&args.summary_prompt);
    request.analysis.max_tokens = args.analysis_tokens;
    request.summary.max_tokens = args.summary_tokens;
    // Greedy with a mild repetition penalty, as `afo generate` defaults to.
    let sampling = SamplingParams::builder()
        .temperature(0.0)
        .repetition_penalty(args.repetition_penalty)
        .build()?;
    request.analysis.sampling = sampling.clone();
    request.summary.sampling = sampling;
    let r = runtime.chain(&request)?;

    for i in &r.images {
        let ratio = i
            .compression_ratio
            .map_or_else(|| "-".into(), |c| format!("{c:.2}"));
        out!(
            "image {}: {}x{} -> {}x{}, grid_thw {:?}, {} image tokens, compression ratio {ratio}",
            i.name,
            i.original.0,
            i.original.1,
            i.resized.0,
            i.resized.1,
            i.grid_thw,
            i.image_tokens
        );
    }
    let shown = |text: &str, tokens: usize| {
        if text.trim().is_empty() {
            format!("({tokens} tokens, no printable text)")
        } else {
            text.trim_end().to_owned()
        }
    };
    out!(
        "\n== analysis ({}) ==\n{}",
        r.vlm_id,
        shown(&r.analysis, r.analysis_tokens.generated)
    );
    out!(
        "\n== summary ({}{}) ==\n{}",
        r.llm_id,
        if r.shared_instance {
            ", the VLM's own language model, same instance"
        } else {
            ""
        },
        shown(&r.summary, r.summary_tokens.generated)
    );
    out!("");
    for s in &r.stages {
        let tokens = match (s.tokens_in, s.tokens_out) {
            (Some(i), Some(o)) => format!(", {i} tokens in, {o} out"),
            (None, Some(o)) => format!(", {o} tokens out"),
            _ => String::new(),
        };
        out!("stage {:<15} {:>9.1} ms{tokens}", s.name, s.latency_ms);
    }
    out!(
        "image pixels {} (from {}), compression ratio {}",
        r.image_pixels,
        r.original_pixels,
        r.compression_ratio
            .map_or_else(|| "-".into(), |c| format!("{c:.2}"))
    );
    out!(
        "memory: predicted peak {}, measured peak {}, cutline {} -> {} (health {:.0}); total {:.1} ms",
        ByteSize(r.predicted_peak_bytes),
        ByteSize(r.peak_memory_bytes),
        ByteSize(r.cutline_bytes),
        r.badge,
        r.health_score,
        r.latency_ms
    );
    Ok(())
}
