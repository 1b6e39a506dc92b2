//! `afo eval perplexity`: perplexity of a model on a text file; `afo eval quality`: the
//! quality of quantization schemes against the f32 model.

use std::path::PathBuf;
use std::time::Instant;

use afo_runtime::engine::{
    LoadedModel, Logits, Model, compare_models, perplexity, streaming_perplexity,
};
use afo_runtime::guard::ByteSize;
use afo_runtime::kvcache::{KvFormat, PrunePolicy};
use afo_runtime::quant::{QuantPolicy, QuantScheme};

use super::bench::results::{KvResult, KvRow};

/// The fixed prompts of `afo eval quality` (each continued greedily by the f32 model).
const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The GNU General Public License is",
];

/// Tokens of greedy continuation added to each prompt.
const CONTINUATION: usize = 48;

/// Subcommands of `afo eval`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Perplexity over non-overlapping windows, scoring the second half of each (as
    /// llama.cpp's perplexity tool does).
    Perplexity {
        /// The model: a GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// The text file.
        #[arg(long)]
        file: PathBuf,
        /// Window size in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// KV cache policy within each window: full, window, sinks (4 sink tokens) or
        /// heavy-hitters (a quarter of the budget recent). With a policy other than
        /// full, each window is read as one stream and every token is scored.
        #[arg(long, default_value = "full")]
        kv_policy: String,
        /// KV budget in tokens for the policy (default: a quarter of `--ctx`).
        #[arg(long)]
        kv_budget: Option<usize>,
        /// How the KV cache holds keys and values: f32, f16, bf16 or q8_0.
        #[arg(long, default_value_t = KvFormat::default())]
        kv_cache: KvFormat,
    },
    /// Perplexity over one long context with the KV cache limited to a budget, for
    /// each pruning policy, against the full cache.
    Kv {
        /// The model.
        #[arg(long)]
        model: PathBuf,
        /// Text file (its first `--tokens` tokens are read as one sequence).
        #[arg(long)]
        file: PathBuf,
        /// Context length in tokens.
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
        /// KV budget in tokens (default: a quarter of `--tokens`).
        #[arg(long)]
        budget: Option<usize>,
        /// Policies: `window:N`, `sinks:S+N`, `h2o:BUDGET/RECENT` (default: each at
        /// the budget; h2o with a quarter of it recent).
        #[arg(long, value_delimiter = ',')]
        policies: Vec<PrunePolicy>,
        /// Tokens per forward pass.
        #[arg(long, default_value_t = 16)]
        chunk: usize,
        /// How the KV cache holds keys and values: f32, f16, bf16 or q8_0.
        #[arg(long, default_value_t = KvFormat::default())]
        kv_cache: KvFormat,
        /// Write the result as JSON to this file (for `afo bench report --from`).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Each scheme against the model dequantized to f32: weight bytes, perplexity,
    /// greedy top-1 agreement and mean KL divergence of the next-token distributions
    /// over fixed prompts.
    Quality {
        /// The model (GGUF file or Hugging Face directory).
        #[arg(long)]
        model: PathBuf,
        /// Schemes of the attention and MLP weights, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "f32,f16,int8,int4,int4-g32-asym,int4-g64-asym,q8_0,q4_0"
        )]
        schemes: Vec<QuantScheme>,
        /// Scheme of the embedding and head (default: at least as precise as each
        /// scheme, see `afo quantize`).
        #[arg(long)]
        embeddings: Option<QuantScheme>,
        /// Text file for perplexity.
        #[arg(long)]
        file: PathBuf,
        /// Perplexity window in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Use only the first N windows of the file for perplexity (all when absent).
        #[arg(long)]
        windows: Option<usize>,
    },
}

/// The greedy continuation of `ids` by `model`, appended.
fn continue_greedily(model: &Model, ids: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
    let mut cache = model.new_cache(ids.len() + n + 1);
    let mut out = ids.to_vec();
    let mut logits = model.forward(ids, &mut cache, Logits::Last)?;
    for _ in 0..n {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        out.push(next);
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
    }
    Ok(out)
}

fn quality(
    model: &std::path::Path,
    schemes: &[QuantScheme],
    embeddings: Option<QuantScheme>,
    file: &std::path::Path,
    ctx: usize,
    windows: Option<usize>,
) -> anyhow::Result<()> {
    let path = super::resolve_model(model)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let spin = super::spinner(format!("loading {} as f32 (the baseline)", path.display()));
    let base = LoadedModel::load_quantized(&path, QuantPolicy::uniform(QuantScheme::F32), |_| {})?;
    spin.finish_and_clear();
    let mut tokens = base.tokenizer().encode(&text, false)?;
    if let Some(w) = windows {
        tokens.truncate(w * ctx);
    }
    let sequences = PROMPTS
        .iter()
        .map(|p| {
            let ids = base.encode_text(p)?;
            continue_greedily(base.model(), &ids, CONTINUATION)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let f32_bytes = base.model().f32_weight_bytes();
    out!(
        "| scheme (attention, MLP) | embedding / head | weights | of f32 | perplexity (ctx {ctx}) | top-1 agreement | mean KL (nats) | max KL |"
    );
    out!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for &scheme in schemes {
        let policy = super::quantize::policy(scheme, embeddings);
        let loaded = if scheme == QuantScheme::F32 && policy == QuantPolicy::uniform(scheme) {
            None
        } else {
            let spin = super::spinner(format!("quantizing to {policy}"));
            let l = LoadedModel::load_quantized(&path, policy, |_| {})?;
            spin.finish_and_clear();
            Some(l)
        };
        let m = loaded.as_ref().map_or(base.model(), |l| l.model());
        let start = Instant::now();
        let spin = super::spinner(format!("evaluating {scheme}"));
        let ppl = perplexity(m, &tokens, ctx, |_, _, _| {})?;
        let agree = compare_models(base.model(), m, &sequences)?;
        spin.finish_and_clear();
        let bytes = m.weight_bytes();
        out!(
            "| {scheme} | {} | {} | {:.1}% | {:.4} | {:.2}% | {:.5} | {:.4} |",
            policy.embedding,
            ByteSize(bytes),
            100.0 * bytes as f64 / f32_bytes as f64,
            ppl.ppl,
            100.0 * agree.top1,
            agree.mean_kl,
            agree.max_kl,
        );
        eprintln!(
            "  {scheme}: {} positions compared, {} tokens scored, {:.1} s",
            agree.positions,
            ppl.tokens_scored,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Perplexity of the first `n` tokens of `file` read as one sequence, with the full
/// cache and with each policy holding at most `budget` tokens (default: a quarter).
pub(crate) fn measure_kv(
    model: &std::path::Path,
    file: &std::path::Path,
    n: usize,
    budget: Option<usize>,
    policies: &[PrunePolicy],
    chunk: usize,
    format: KvFormat,
) -> anyhow::Result<KvResult> {
    let path = super::resolve_model(model)?;
    let spin = super::spinner(format!("loading {}", path.display()));
    let mut loaded = LoadedModel::load(&path)?;
    loaded.set_kv_format(format)?;
    spin.finish_and_clear();
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let mut tokens = loaded.tokenizer().encode(&text, false)?;
    anyhow::ensure!(
        tokens.len() >= n,
        "{} has {} tokens, fewer than {n}",
        file.display(),
        tokens.len()
    );
    tokens.truncate(n);
    let budget = budget.unwrap_or(n / 4);
    let policies = if policies.is_empty() {
        vec![
            PrunePolicy::SlidingWindow { window: budget },
            PrunePolicy::Sinks {
                sink_tokens: 4,
                window: budget.saturating_sub(4),
            },
            PrunePolicy::HeavyHitters {
                budget,
                recent: budget / 4,
            },
        ]
    } else {
        policies.to_vec()
    };
    let m = loaded.model();
    let start = Instant::now();
    let mut full_cache = m.new_cache(n);
    let full = streaming_perplexity(m, &tokens, chunk, &mut full_cache)?;
    let mut rows = vec![KvRow {
        policy: "full".into(),
        perplexity: full.ppl,
        kv_bytes: full_cache.bytes(),
        evicted_tokens: 0,
        seconds: start.elapsed().as_secs_f64(),
    }];
    for policy in policies {
        let start = Instant::now();
        let mut cache = m.new_pruned_cache(n, Some(budget), policy);
        let p = streaming_perplexity(m, &tokens, chunk, &mut cache)?;
        rows.push(KvRow {
            policy: policy.to_string(),
            perplexity: p.ppl,
            kv_bytes: cache.bytes(),
            evicted_tokens: cache.evicted_tokens(),
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(KvResult {
        model: model.display().to_string(),
        file: file.display().to_string(),
        tokens: n,
        budget,
        chunk,
        rows,
    })
}

pub(crate) fn print_kv(r: &KvResult) -> anyhow::Result<()> {
    let n = r.tokens;
    out!(
        "{n} tokens of {}, chunks of {}, KV budget {} tokens ({:.0}%)",
        r.file,
        r.chunk,
        r.budget,
        100.0 * r.budget as f64 / n as f64
    );
    out!("| cache | perplexity | vs full | KV bytes held at the end | tokens evicted | time |");
    out!("| --- | --- | --- | --- | --- | --- |");
    let full = r.rows.first().map_or(f64::NAN, |row| row.perplexity);
    for (i, row) in r.rows.iter().enumerate() {
        if i == 0 {
            out!(
                "| full ({n} tokens) | {:.4} | - | {} | 0 | {:.1} s |",
                row.perplexity,
                ByteSize(row.kv_bytes),
                row.seconds
            );
        } else {
            out!(
                "| {} | {:.4} | {:+.2}% | {} | {} | {:.1} s |",
                row.policy,
                row.perplexity,
                100.0 * (row.perplexity / full - 1.0),
                ByteSize(row.kv_bytes),
                row.evicted_tokens,
                row.seconds
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn kv(
    model: &std::path::Path,
    file: &std::path::Path,
    n: usize,
    budget: Option<usize>,
    policies: &[PrunePolicy],
    chunk: usize,
    format: KvFormat,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let r = measure_kv(model, file, n, budget, policies, chunk, format)?;
    print_kv(&r)?;
    if let Some(path) = json {
        super::bench::write_json(path, super::bench::results::BenchResult::Kv(r))?;
    }
    Ok(())
}

pub(crate) fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Kv {
            model,
            file,
            tokens,
            budget,
            policies,
            chunk,
            kv_cache,
            json,
        } => kv(
            model,
            file,
            *tokens,
            *budget,
            policies,
            *chunk,
            *kv_cache,
            json.as_deref(),
        ),
        Command::Quality {
            model,
            schemes,
            embeddings,
            file,
            ctx,
            windows,
        } => quality(model, schemes, *embeddings, file, *ctx, *windows),
        Command::Perplexity {
            model,
            file,
            ctx,
            kv_policy,
            kv_budget,
            kv_cache,
        } if kv_policy != "full" => {
            let budget = kv_budget.unwrap_or(ctx / 4);
            let policy = match kv_policy.as_str() {
                "window" => PrunePolicy::SlidingWindow { window: budget },
                "sinks" => PrunePolicy::Sinks {
                    sink_tokens: 4,
                    window: budget.saturating_sub(4),
                },
                "heavy-hitters" | "h2o" => PrunePolicy::HeavyHitters {
                    budget,
                    recent: budget / 4,
                },
                other => other.parse()?,
            };
            kv(
                model,
                file,
                *ctx,
                Some(budget),
                &[policy],
                16,
                *kv_cache,
                None,
            )
        }
        Command::Perplexity {
            model,
            file,
            ctx,
            kv_cache,
            ..
        } => {
            let path = super::resolve_model(model)?;
            let spin = super::spinner(format!("loading {}", path.display()));
            let mut loaded = LoadedModel::load(&path)?;
            loaded.set_kv_format(*kv_cache)?;
            spin.finish_and_clear();
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let tokens = loaded.tokenizer().encode(&text, false)?;
            eprintln!(
                "{} tokens, {} windows of {ctx}",
                tokens.len(),
                tokens.len() / ctx
            );
            let start = Instant::now();
            // A bar over the windows on a terminal; nothing when piped.
            let bar = indicatif::ProgressBar::new((tokens.len() / ctx) as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} windows, {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let p = perplexity(loaded.model(), &tokens, *ctx, |done, _, ppl| {
                bar.set_position(done as u64);
                bar.set_message(format!("perplexity {ppl:.4}"));
            })?;
            bar.finish_and_clear();
            let secs = start.elapsed().as_secs_f64();
            out!(
                "perplexity {:.4} (nll {:.4}) over {} scored tokens in {} windows of {ctx}; {:.1} s, {:.0} tokens/s; KV cache {kv_cache}, {} per token",
                p.ppl,
                p.nll,
                p.tokens_scored,
                p.windows,
                secs,
                (p.windows * ctx) as f64 / secs,
                ByteSize(loaded.model().kv_bytes_per_token())
            );
            Ok(())
        }
    }
}
