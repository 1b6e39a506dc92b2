//! `afo quantize`: quantize a model by a policy and save it as GGUF.

use std::path::PathBuf;
use std::time::Instant;

use afo_runtime::engine::{GgufFile, LoadedModel, save_gguf};
use afo_runtime::guard::{ByteSize, PeakTracker};
use afo_runtime::quant::{QuantPolicy, QuantScheme};

/// Arguments of `afo quantize`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The model to quantize: a GGUF file (its metadata and tokenizer are kept).
    #[arg(long)]
    model: PathBuf,
    /// Scheme of the attention and MLP weights: int8, int4 (group 32), int4-g64,
    /// int4-g128, int4-g32-asym, ..., a GGML type (q8_0, q4_0, q4_k, ...), f16, bf16, f32.
    #[arg(long)]
    scheme: QuantScheme,
    /// Scheme of the embedding and the head (default: int8 for 4-bit `--scheme`, q8_0
    /// for int8, f16 for GGML 8-bit ones, the same for dense ones).
    #[arg(long)]
    embeddings: Option<QuantScheme>,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
}

/// The policy of `--scheme` and `--embeddings`.
pub(crate) fn policy(scheme: QuantScheme, embeddings: Option<QuantScheme>) -> QuantPolicy {
    let p = QuantPolicy::new(scheme);
    match embeddings {
        Some(e) => p.with_edges(e),
        None => p,
    }
}

/// A progress bar over the model's weights (a line per weight when stderr is not a
/// terminal would flood logs: then only every tenth).
pub(crate) fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let policy = policy(args.scheme, args.embeddings);
    let path = super::resolve_model(&args.model)?;
    eprintln!("quantizing {} ({policy})", path.display());
    let bar = progress_bar();
    let hidden = bar.is_hidden();
    let tracker = PeakTracker::start(None);
    let start = Instant::now();
    let loaded = LoadedModel::load_quantized(&path, policy, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} -> {}", p.name, p.scheme));
        if hidden && (p.done % 10 == 0 || p.done == p.total) {
            eprintln!("[{}/{}] {} -> {}", p.done, p.total, p.name, p.scheme);
        }
    })?;
    bar.finish_and_clear();
    let quantize_s = start.elapsed().as_secs_f64();
    let weights = loaded.model().weight_bytes();
    let before = tracker.start_rss();
    let load_peak = tracker.finish();
    let largest_f32 = loaded
        .model()
        .linears()
        .iter()
        .map(|(_, l)| 4 * (l.in_features() * l.out_features()) as u64)
        .max()
        .unwrap_or(0);
    let tracker = PeakTracker::start(None);
    let mut source = GgufFile::open(&path)?;
    let spinner = super::spinner(format!("writing {}", args.out.display()));
    let report = save_gguf(loaded.model(), &mut source, Some(&policy), &args.out);
    spinner.finish_and_clear();
    let report = report?;
    let save_peak = tracker.finish();
    out!(
        "wrote {} ({}, {} tensors) in {:.1} s; quantized in {quantize_s:.1} s to weights of {} \
         in memory",
        report.path.display(),
        ByteSize(report.file_bytes),
        report.tensors,
        start.elapsed().as_secs_f64() - quantize_s,
        ByteSize(weights),
    );
    out!(
        "peak resident while quantizing {} = {} before + weights + {} (tokenizer, file \
         header, the source tensor, rows in flight; the largest weight in f32 would be {}); \
         while saving {}",
        ByteSize(load_peak),
        ByteSize(before),
        ByteSize(load_peak.saturating_sub(weights + before)),
        ByteSize(largest_f32),
        ByteSize(save_peak),
    );
    Ok(())
}
