//! `afo bench`: prefill and decode speed of a model, cold load vs warm re-acquire,
//! batching, memory prediction, the prefix cache's time to first token, image
//! preprocessing, and `afo bench report`, which runs them all (or reads their saved
//! results) and writes one self-contained HTML report.
//!
//! Each mode measures into a result struct ([`results`]), prints it, and writes it
//! as JSON with `--json FILE`.

mod machine;
mod report;
pub(crate) mod results;
mod svg;

use std::path::{Path, PathBuf};
use std::time::Instant;

use afo_runtime::Runtime;
use afo_runtime::engine::{LoadedModel, Logits};
use afo_runtime::guard::ByteSize;

use results::{
    BatchingPoint, BatchingResult, BenchResult, ImageResult, ImageRow, KernelUse, MemoryResult,
    MemoryRow, MemoryRun, PrefixResult, SpeedResult,
};

/// What `afo bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Prefill and decode of one sequence, and cold load vs warm re-acquire.
    Speed,
    /// Aggregate decode speed of many sequences batched (`--concurrency`).
    Batching,
    /// Predicted against measured peak memory (`--predict`).
    Memory,
    /// Time to first token with a cached prompt prefix against without
    /// (`--prefix-tokens`, `--text`).
    Prefix,
    /// Image preprocessing time and peak memory per image size (`--image-sizes`),
    /// on synthetic photos made at run time.
    Image,
    /// Run every benchmark (or read saved results with `--from`) and write one HTML
    /// report with plots (`--out`), and its results as JSON beside it.
    Report,
}

/// Arguments of `afo bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// What to measure.
    #[arg(value_enum, default_value = "speed")]
    mode: Mode,
    /// The model: a GGUF file (every mode but `image`, and `report --from`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens generated for the decode measurement.
    #[arg(long, default_value_t = 64)]
    generate: usize,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Quantize the attention and MLP weights to this scheme while loading.
    #[arg(long)]
    scheme: Option<afo_runtime::quant::QuantScheme>,
    /// With `--scheme`: the embedding and head's scheme (default: one step more
    /// precise than `--scheme`, as `afo quantize` does).
    #[arg(long, requires = "scheme")]
    embeddings: Option<afo_runtime::quant::QuantScheme>,
    /// How the KV cache holds keys and values: f32, f16, bf16 or q8_0.
    #[arg(long, default_value_t = afo_runtime::kvcache::KvFormat::default())]
    kv_cache: afo_runtime::kvcache::KvFormat,
    /// Tokens already in the KV cache when the decode steps are timed: in `speed`
    /// mode llama-bench's `-d` (decode at depth reads the cache as well as the
    /// weights); in `batching` mode each sequence's prompt, llama-batched-bench's
    /// `-npp` ([`BATCH_PROMPT`] tokens when 0).
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// `memory`: prompt lengths (tokens) of the runs whose predicted peak is compared
    /// with the measured one.
    #[arg(long, value_delimiter = ',', default_value = "16,128,512,1024,2048")]
    predict: Vec<usize>,
    /// `memory`: concurrent runs (one thread each, `--prompt` tokens, the runtime's
    /// shared ledger) whose predicted peak is compared with the measured one; then
    /// one image -> summary chain on the tiny seeded VLM and the model.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    batches: Vec<usize>,
    /// `batching`: sequence counts decoded together by the batching scheduler.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    concurrency: Vec<usize>,
    /// `prefix`: tokens of the shared prompt prefix.
    #[arg(long, default_value_t = 1000)]
    prefix_tokens: usize,
    /// `prefix` (and the KV policies of `report`): the text read.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    text: PathBuf,
    /// `image`: sizes of the synthetic photos, `WIDTHxHEIGHT`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "640x480,1920x1080,4000x3000"
    )]
    image_sizes: Vec<String>,
    /// `image`: the pixel budget of the preprocessing (Qwen3-VL's defaults otherwise).
    #[arg(long, default_value_t = 1 << 20)]
    image_max_pixels: usize,
    /// Write the result as JSON to this file (for `report`: the results of the
    /// suite; default: `--out` with the extension `.json`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// `report`: the HTML file written.
    #[arg(long, default_value = "report.html")]
    out: PathBuf,
    /// `report`: read results saved with `--json` (files, or folders of `*.json`)
    /// instead of measuring.
    #[arg(long, num_args = 1..)]
    from: Vec<PathBuf>,
    /// `report`: llama.cpp's results on the same model (`llama-bench -o json`),
    /// compared per weight format.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// `report`: small sizes, so the suite runs in about a minute.
    #[arg(long)]
    quick: bool,
    /// `report`: schemes measured besides the model's own format.
    #[arg(long, value_delimiter = ',', default_value = "int8,int4")]
    schemes: Vec<afo_runtime::quant::QuantScheme>,
}

impl Args {
    fn model(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(m) => super::resolve_model(m),
            None => anyhow::bail!("afo bench {:?}: --model is required", self.mode),
        }
    }

    /// The weight format measured: the scheme, or the file's main type.
    fn format(&self, model: &Path) -> String {
        match self.scheme {
            Some(s) => s.to_string(),
            None => native_format(model),
        }
    }
}

/// The type that holds most of a GGUF file's parameters (`Q4_1`), or `native` for
/// other formats.
fn native_format(model: &Path) -> String {
    afo_runtime::engine::GgufFile::open(model)
        .ok()
        .and_then(|g| {
            g.describe()
                .by_type
                .iter()
                .max_by_key(|t| t.parameters)
                .map(|t| t.scheme.clone())
        })
        .unwrap_or_else(|| "native".into())
}

/// Time to first token of prompts that start with the same `--prefix-tokens` of
/// `--text` and end with a different question each round: cold (no prefix cache), the
/// first run with the prefix cache (a miss that publishes the prefix), and cached.
fn prefix(args: &Args, model_path: &Path, loaded: &LoadedModel) -> anyhow::Result<PrefixResult> {
    use afo_runtime::engine::{
        GenerateOptions, PrefixReuse, SamplingParams, generate, generate_with_prefix,
    };
    use afo_runtime::kvcache::{PrefixCache, PrefixCacheConfig, Salt};
    use std::ops::ControlFlow;

    let text = std::fs::read_to_string(&args.text)
        .map_err(|e| anyhow::anyhow!("prefix text {}: {e}", args.text.display()))?;
    let mut prefix = loaded.encode_text(&text)?;
    anyhow::ensure!(
        prefix.len() >= args.prefix_tokens,
        "{} has {} tokens, fewer than --prefix-tokens {}",
        args.text.display(),
        prefix.len(),
        args.prefix_tokens
    );
    prefix.truncate(args.prefix_tokens);
    let model = loaded.model();
    let options = GenerateOptions {
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let prompt = |round: usize| -> anyhow::Result<Vec<u32>> {
        let mut p = prefix.clone();
        let question = format!(
            "\n\nQuestion {round}: what does section {} of this license say?\nAnswer:",
            round + 1
        );
        p.extend(loaded.encode_text(&question)?);
        Ok(p)
    };
    let ttft = |g: afo_runtime::engine::Generation| g.timings.ttft_ms.unwrap_or(f64::NAN);
    let rounds = args.rounds.max(1);
    let (mut cold, mut first, mut cached, mut hit) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let (mut publish, mut seed) = (Vec::new(), Vec::new());
    let salt = Salt::new(loaded.id().as_bytes());
    for round in 0..rounds {
        let p = prompt(round)?;
        // A fresh prefix cache each round: the first run misses and publishes, the
        // next (another question after the same prefix) hits.
        let prefixes = PrefixCache::new(PrefixCacheConfig::default())?;
        let reuse = PrefixReuse {
            cache: &prefixes,
            salt,
        };
        let run_cold = || -> anyhow::Result<(f64, afo_runtime::kvcache::KvCache)> {
            let mut cache = model.new_cache(p.len() + 1);
            let g = generate(model, loaded.tokenizer(), &p, &options, &mut cache, |_| {
                ControlFlow::Continue(())
            })?;
            Ok((ttft(g), cache))
        };
        let run_first = || -> anyhow::Result<f64> {
            let mut cache = model.new_cache(p.len() + 1);
            Ok(ttft(generate_with_prefix(
                model,
                loaded.tokenizer(),
                &p,
                &options,
                &mut cache,
                reuse,
                |_| ControlFlow::Continue(()),
            )?))
        };
        // Alternate which of the two goes first: the machine drifts.
        let (c, cache, f) = if round % 2 == 0 {
            let (c, cache) = run_cold()?;
            (c, cache, run_first()?)
        } else {
            let f = run_first()?;
            let (c, cache) = run_cold()?;
            (c, cache, f)
        };
        cold.push(c);
        first.push(f);
        // What publishing and seeding cost alone, on the cold run's cache.
        let alone = PrefixCache::new(PrefixCacheConfig::default())?;
        let t = Instant::now();
        alone.insert(salt, &p, &cache)?;
        publish.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        alone
            .lookup(salt, &p[..p.len() - 1])
            .seed(&mut model.new_cache(p.len() + 1))?;
        seed.push(t.elapsed().as_secs_f64() * 1e3);
        let p = prompt(round + rounds)?;
        let mut cache = model.new_cache(p.len() + 1);
        let g = generate_with_prefix(
            model,
            loaded.tokenizer(),
            &p,
            &options,
            &mut cache,
            reuse,
            |_| ControlFlow::Continue(()),
        )?;
        hit = g.prefix_hit_tokens;
        cached.push(ttft(g));
    }
    Ok(PrefixResult {
        model: model_path.display().to_string(),
        prefix_tokens: prefix.len(),
        text: args.text.display().to_string(),
        rounds,
        threads: rayon_threads(),
        cold_ms: median(cold),
        first_ms: median(first),
        cached_ms: median(cached),
        hit_tokens: hit,
        publish_ms: median(publish),
        seed_ms: median(seed),
    })
}

fn print_prefix(r: &PrefixResult) -> anyhow::Result<()> {
    let ratio = r.cached_ms / r.cold_ms;
    out!(
        "prefix {} tokens of {}, {} rounds, threads {}",
        r.prefix_tokens,
        r.text,
        r.rounds,
        r.threads
    );
    out!("| run | TTFT (median) | vs cold |");
    out!("| --- | --- | --- |");
    out!("| cold (no prefix cache) | {:.1} ms | 100% |", r.cold_ms);
    out!(
        "| first with the prefix cache (miss, publishes) | {:.1} ms | {:.1}% |",
        r.first_ms,
        100.0 * r.first_ms / r.cold_ms
    );
    out!(
        "| cached ({} prefix tokens reused) | {:.1} ms | {:.1}% |",
        r.hit_tokens,
        r.cached_ms,
        100.0 * ratio
    );
    out!(
        "publishing the prefix alone: {:.1} ms, seeding a cache from it: {:.1} ms (medians)",
        r.publish_ms,
        r.seed_ms
    );
    out!(
        "cached / cold = {:.1}% (goal <= 20%: {})",
        100.0 * ratio,
        if ratio <= 0.2 { "met" } else { "not met" }
    );
    Ok(())
}

/// Prompt tokens of each sequence `afo bench batching` decodes when `--depth` is 0.
const BATCH_PROMPT: usize = 16;

/// Aggregate decode speed of `n` sequences batched, for each `n`: each sequence's
/// prompt (`--depth` tokens, [`BATCH_PROMPT`] when 0) runs first, untimed, until every
/// sequence has sampled its first token; then the steps that generate the rest of its
/// `--generate` tokens are timed.
fn batch(args: &Args, model_path: &Path, loaded: &LoadedModel) -> anyhow::Result<BatchingResult> {
    use afo_runtime::engine::{GenerateOptions, SamplingParams, Scheduler};
    let prompt_len = if args.depth == 0 {
        BATCH_PROMPT
    } else {
        args.depth
    };
    let model = loaded.model();
    let vocab = model.config().vocab_size as u32;
    let mut points = Vec::new();
    for &n in &args.concurrency {
        let mut rates = Vec::new();
        for _ in 0..args.rounds.max(1) {
            let mut s = Scheduler::new(model, loaded.tokenizer(), n);
            for i in 0..n as u32 {
                let prompt: Vec<u32> = (0..prompt_len as u32)
                    .map(|j| (i * 7919 + j * 31 + 13) % vocab)
                    .collect();
                s.add_request(
                    prompt,
                    GenerateOptions {
                        max_tokens: args.generate,
                        sampling: SamplingParams::greedy(),
                        ignore_eos: true,
                        ..GenerateOptions::default()
                    },
                )?;
            }
            // Untimed: the steps that admit every sequence and run the prompts (one
            // prefill chunk a step) until each has sampled its first token.
            let mut started = std::collections::HashSet::new();
            while started.len() < n && s.has_unfinished() {
                started.extend(s.step()?.iter().filter(|o| o.token.is_some()).map(|o| o.id));
            }
            let t = Instant::now();
            let mut tokens = 0usize;
            while s.has_unfinished() {
                tokens += s.step()?.iter().filter(|o| o.token.is_some()).count();
            }
            rates.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
        points.push(BatchingPoint {
            sequences: n,
            tok_s: median(rates),
        });
    }
    Ok(BatchingResult {
        model: model_path.display().to_string(),
        format: args.format(model_path),
        prompt_tokens: prompt_len,
        generated_tokens: args.generate,
        rounds: args.rounds.max(1),
        points,
    })
}

fn print_batching(r: &BatchingResult) -> anyhow::Result<()> {
    out!("| sequences | decode tok/s (all sequences) | per sequence | vs 1 sequence |");
    out!("| --- | --- | --- | --- |");
    let base = r.points.first().map_or(f64::NAN, |p| p.tok_s);
    for p in &r.points {
        out!(
            "| {} | {:.1} | {:.1} | {:.2}x |",
            p.sequences,
            p.tok_s,
            p.tok_s / p.sequences as f64,
            p.tok_s / base
        );
    }
    out!(
        "each sequence: a {}-token prompt and its first token (untimed), then the rest of {} tokens generated (timed)",
        r.prompt_tokens,
        r.generated_tokens
    );
    Ok(())
}

/// Predicted against measured peak memory, one warm run per prompt length.
fn predict(args: &Args, model: &Path) -> anyhow::Result<MemoryResult> {
    use afo_runtime::engine::{GenerateOptions, SamplingParams};
    use afo_runtime::{GenerateRequest, Prompt};

    let runtime = Runtime::builder().kv_format(args.kv_cache).build()?;
    let request = |prompt: String| {
        let mut r =
            GenerateRequest::new(model, Prompt::Text(prompt)).with_options(GenerateOptions {
                max_tokens: args.generate,
                sampling: SamplingParams::greedy(),
                ignore_eos: true,
                ..GenerateOptions::default()
            });
        r.scheme = args.scheme;
        r
    };
    // Load first: the table is about runs, not loading.
    runtime.generate(&request("Hello".into()))?;
    let mut rows = Vec::new();
    for &n in &args.predict {
        // " the" is one token in GPT-2 style vocabularies.
        let r = runtime.generate(&request(" the".repeat(n)))?;
        rows.push(MemoryRow {
            run: MemoryRun::Prompt {
                prompt_tokens: r.prompt_tokens,
                generated: r.completion_tokens,
            },
            predicted_bytes: r.predicted_peak_bytes,
            measured_bytes: r.peak_memory_bytes,
        });
    }
    // Concurrent runs: each is admitted on the shared ledger, the last one seeing
    // the others' reservations; the batch's prediction is the highest of its runs',
    // its measurement the process's peak over them all.
    for &n in &args.batches {
        let responses = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|_| scope.spawn(|| runtime.generate(&request(" the".repeat(args.prompt)))))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a run of the batch panicked"))?
                        .map_err(anyhow::Error::from)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let max = |f: fn(&afo_runtime::GenerateResponse) -> u64| {
            responses.iter().map(f).max().unwrap_or(0)
        };
        rows.push(MemoryRow {
            run: MemoryRun::Batch {
                runs: n,
                prompt_tokens: responses.first().map_or(0, |r| r.prompt_tokens),
                generated: args.generate,
                degraded: responses
                    .iter()
                    .filter(|r| r.admission.decision != "admitted")
                    .count(),
            },
            predicted_bytes: max(|r| r.predicted_peak_bytes),
            measured_bytes: max(|r| r.peak_memory_bytes),
        });
    }
    // A chain: the tiny VLM describes the shipped sample image, the model summarises.
    let vlm = std::env::temp_dir().join(format!("afo-bench-vlm-{}", std::process::id()));
    afo_runtime::engine::TinyVlm::default().write(&vlm)?;
    let image = afo_runtime::ChainImage {
        name: "sample.jpg".into(),
        bytes: super::chain::SAMPLE_JPEG.to_vec(),
    };
    let mut chain = afo_runtime::ChainRequest::new(&vlm, vec![image], "Describe the image.");
    chain.llm = Some(model.to_path_buf());
    let result = runtime.chain(&chain);
    std::fs::remove_dir_all(&vlm)?;
    let r = result?;
    rows.push(MemoryRow {
        run: MemoryRun::Chain {
            analysis_tokens: r.analysis_tokens.generated,
            summary_tokens: r.summary_tokens.generated,
        },
        predicted_bytes: r.predicted_peak_bytes,
        measured_bytes: r.peak_memory_bytes,
    });
    Ok(MemoryResult {
        model: model.display().to_string(),
        rows,
    })
}

fn print_memory(r: &MemoryResult) -> anyhow::Result<()> {
    out!("| prompt tokens | generated | predicted peak | measured peak | error |");
    out!("| --- | --- | --- | --- | --- |");
    for row in &r.rows {
        let (p, m, e) = (
            ByteSize(row.predicted_bytes),
            ByteSize(row.measured_bytes),
            row.error_percent(),
        );
        match &row.run {
            MemoryRun::Prompt {
                prompt_tokens,
                generated,
            } => out!("| {prompt_tokens} | {generated} | {p} | {m} | {e:+.1}% |"),
            MemoryRun::Batch {
                runs,
                prompt_tokens,
                generated,
                degraded,
            } => out!(
                "| {runs} x {prompt_tokens} | {generated} each | {p} | {m} | {e:+.1}% |{}",
                if *degraded > 0 {
                    format!(" ({degraded} degraded)")
                } else {
                    String::new()
                }
            ),
            MemoryRun::Chain {
                analysis_tokens,
                summary_tokens,
            } => out!(
                "| chain (tiny VLM + summary) | {analysis_tokens} + {summary_tokens} | {p} | {m} | {e:+.1}% |"
            ),
        }
    }
    Ok(())
}

/// `WIDTHxHEIGHT`, each at least 1.
fn parse_size(s: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || anyhow::anyhow!("--image-sizes `{s}`: expected WIDTHxHEIGHT, such as 1920x1080");
    let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    anyhow::ensure!(
        (1..=20_000).contains(&w) && (1..=20_000).contains(&h),
        "--image-sizes `{s}`: each side must be 1 to 20000 pixels"
    );
    Ok((w, h))
}

/// A synthetic photo: a smooth gradient plus deterministic noise, JPEG quality 90.
fn synthetic_jpeg(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let mut state = 0x9e37_79b9_u32;
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state >> 27) as u8;
        let r = (x * 255 / width.max(1)) as u8;
        let g = (y * 255 / height.max(1)) as u8;
        let b = ((x + y) * 127 / (width + height).max(1)) as u8;
        image::Rgb([
            r.saturating_add(noise),
            g.saturating_add(noise),
            b.saturating_add(noise),
        ])
    });
    Ok(afo_runtime::image::encode_rgb8(
        &image,
        afo_runtime::image::Encoding::Jpeg { quality: 90 },
    )?)
}

/// Preprocessing time (median) and peak (highest above the start) per image size.
fn image(args: &Args) -> anyhow::Result<ImageResult> {
    use afo_runtime::guard::PeakTracker;
    use afo_runtime::image::{DecodeLimits, PreprocessorConfig, preprocess};
    let mut config = PreprocessorConfig::qwen3_vl();
    config.max_pixels = args.image_max_pixels.max(config.min_pixels);
    config.validate()?;
    let limits = DecodeLimits::default();
    let mut rows = Vec::new();
    for size in &args.image_sizes {
        let (width, height) = parse_size(size)?;
        let bytes = synthetic_jpeg(width, height)?;
        let (mut times, mut peak, mut last) = (Vec::new(), 0u64, None);
        for _ in 0..args.rounds.max(1) {
            let tracker = PeakTracker::start(None);
            let start_rss = tracker.start_rss();
            let t = Instant::now();
            let p = preprocess(&bytes, &config, &limits)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            peak = peak.max(tracker.finish().saturating_sub(start_rss));
            last = Some((p.resized, p.num_image_tokens()));
        }
        let ((rw, rh), tokens) = last.unwrap_or(((0, 0), 0));
        rows.push(ImageRow {
            width,
            height,
            file_bytes: bytes.len() as u64,
            resized_width: rw as usize,
            resized_height: rh as usize,
            tokens,
            ms: median(times),
            peak_bytes: peak,
        });
    }
    Ok(ImageResult {
        config: format!("qwen3-vl, max_pixels {}", config.max_pixels),
        rounds: args.rounds.max(1),
        rows,
    })
}

fn print_image(r: &ImageResult) -> anyhow::Result<()> {
    out!(
        "{}, {} rounds (time: median; peak: highest)",
        r.config,
        r.rounds
    );
    out!("| image | file | resized | tokens | time | peak above the start |");
    out!("| --- | --- | --- | --- | --- | --- |");
    for row in &r.rows {
        out!(
            "| {} | {} | {}x{} | {} | {:.1} ms | {} |",
            row.size(),
            ByteSize(row.file_bytes),
            row.resized_width,
            row.resized_height,
            row.tokens,
            row.ms,
            ByteSize(row.peak_bytes)
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Cold load and warm re-acquire of the model in a fresh runtime, in ms.
fn load_times(args: &Args, model: &Path) -> anyhow::Result<(f64, f64)> {
    let runtime = Runtime::builder().kv_format(args.kv_cache).build()?;
    let cold_ms = runtime.preload(model)?.acquire_ms;
    let warm: Vec<f64> = (0..args.rounds.max(1) * 20)
        .map(|_| runtime.preload(model).map(|p| p.acquire_ms))
        .collect::<Result<_, _>>()?;
    Ok((cold_ms, median(warm)))
}

/// Prefill and decode of one sequence.
fn speed(
    args: &Args,
    model_path: &Path,
    loaded: &LoadedModel,
    (cold_load_ms, warm_acquire_ms): (f64, f64),
) -> anyhow::Result<SpeedResult> {
    let model = loaded.model();
    let vocab = model.config().vocab_size as u32;
    // Deterministic, varied token ids.
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds.max(1) {
        let mut cache = model.new_cache(args.prompt + args.generate + 1);
        let t = Instant::now();
        let logits = model.forward(&prompt, &mut cache, Logits::Last)?;
        pp.push(args.prompt as f64 / t.elapsed().as_secs_f64());
        let mut next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        let mut cache = model.new_cache(args.depth + args.generate + 2);
        let context: Vec<u32> = (0..args.depth as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .chain([next])
            .collect();
        for chunk in context.chunks(512) {
            model.forward(chunk, &mut cache, Logits::Last)?;
        }
        let t = Instant::now();
        for _ in 0..args.generate {
            let logits = model.forward(&[next], &mut cache, Logits::Last)?;
            next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        }
        tg.push(args.generate as f64 / t.elapsed().as_secs_f64());
    }
    let uses = |rows| {
        model
            .kernel_paths(rows)
            .into_iter()
            .map(|(path, matrices, bytes)| KernelUse {
                path,
                matrices,
                bytes,
            })
            .collect()
    };
    // The measured steps read the KV cache at positions depth + 1..=generate: on
    // average depth and half.
    let kv = model.kv_bytes_per_token() * (2 * args.depth as u64 + args.generate as u64 + 1) / 2;
    Ok(SpeedResult {
        model: model_path.display().to_string(),
        format: args.format(model_path),
        prompt_tokens: args.prompt,
        generated_tokens: args.generate,
        rounds: args.rounds,
        threads: rayon_threads(),
        prefill_tok_s: median(pp),
        decode_tok_s: median(tg),
        cold_load_ms,
        warm_acquire_ms,
        cpu_features: machine::cpu_features(),
        decode_kernels: uses(1),
        prefill_kernels: uses(args.prompt),
        decode_bytes_per_token: model.decode_weight_bytes() + kv,
        read_bandwidth_gbs: afo_runtime::quant::kernels::measure_read_bandwidth(
            BANDWIDTH_BUFFER_BYTES,
            5,
        ) / 1e9,
        depth: args.depth,
        kv_format: model.kv_format().to_string(),
    })
}

/// The buffer the memory bandwidth is measured over: well above any last-level cache.
const BANDWIDTH_BUFFER_BYTES: usize = 256 << 20;

fn kernel_line(uses: &[KernelUse]) -> String {
    uses.iter()
        .map(|u| {
            format!(
                "{} ({} {}, {})",
                u.path,
                u.matrices,
                if u.matrices == 1 {
                    "matrix"
                } else {
                    "matrices"
                },
                ByteSize(u.bytes)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn print_speed(r: &SpeedResult) -> anyhow::Result<()> {
    let depth = if r.depth > 0 {
        format!(" @ d{}", r.depth)
    } else {
        String::new()
    };
    out!(
        "prefill pp{}: {:.1} tok/s (median of {}), decode tg{}{depth}: {:.1} tok/s (median of {}), threads {}, KV cache {}",
        r.prompt_tokens,
        r.prefill_tok_s,
        r.rounds,
        r.generated_tokens,
        r.decode_tok_s,
        r.rounds,
        r.threads,
        r.kv_format
    );
    out!("cpu: {}", r.cpu_features.join(" "));
    out!("decode kernels: {}", kernel_line(&r.decode_kernels));
    out!("prefill kernels: {}", kernel_line(&r.prefill_kernels));
    out!(
        "roofline: a decode step reads {} (weights it multiplies + KV at the mean position); \
         memory reads {:.1} GB/s, so at most {:.1} tok/s: decode is {:.0}% of the roofline",
        ByteSize(r.decode_bytes_per_token),
        r.read_bandwidth_gbs,
        r.roofline_tok_s(),
        r.roofline_fraction() * 100.0
    );
    Ok(())
}

/// Measures one mode (not `report`) and prints its result.
fn measure(args: &Args) -> anyhow::Result<BenchResult> {
    if args.mode == Mode::Image {
        let r = image(args)?;
        print_image(&r)?;
        return Ok(BenchResult::Image(r));
    }
    let model = args.model()?;
    if args.mode == Mode::Memory {
        let r = predict(args, &model)?;
        print_memory(&r)?;
        return Ok(BenchResult::Memory(r));
    }
    let (cold_ms, warm_ms) = load_times(args, &model)?;
    out!(
        "load: cold {cold_ms:.1} ms, warm re-acquire {:.4} ms (median), ratio {:.0}x",
        warm_ms,
        cold_ms / warm_ms
    );
    let mut loaded = match args.scheme {
        Some(s) => {
            let mut policy = afo_runtime::quant::QuantPolicy::new(s);
            if let Some(e) = args.embeddings {
                policy = policy.with_edges(e);
            }
            LoadedModel::load_quantized(&model, policy, |_| {})?
        }
        None => LoadedModel::load(&model)?,
    };
    loaded.set_kv_format(args.kv_cache)?;
    Ok(match args.mode {
        Mode::Batching => {
            let r = batch(args, &model, &loaded)?;
            print_batching(&r)?;
            BenchResult::Batching(r)
        }
        Mode::Prefix => {
            let r = prefix(args, &model, &loaded)?;
            print_prefix(&r)?;
            BenchResult::Prefix(r)
        }
        _ => {
            let r = speed(args, &model, &loaded, (cold_ms, warm_ms))?;
            print_speed(&r)?;
            BenchResult::Speed(r)
        }
    })
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if args.mode == Mode::Report {
        return report::run(args);
    }
    let result = measure(args)?;
    if let Some(path) = &args.json {
        machine::bench_file(vec![result]).write(path)?;
    }
    Ok(())
}

/// Writes `result` to `--json FILE` as [`results::BenchFile`], for the modes that
/// live elsewhere (`afo eval kv`).
pub(crate) fn write_json(path: &Path, result: BenchResult) -> anyhow::Result<()> {
    machine::bench_file(vec![result]).write(path)
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
}
