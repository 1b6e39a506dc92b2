//! `afo bench`: prefill and decode speed of a model, cold load vs warm re-acquire,
//! batching, memory prediction, and the prefix cache's time to first token.

use std::path::PathBuf;
use std::time::Instant;

use afo_runtime::Runtime;
use afo_runtime::engine::{LoadedModel, Logits};

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
}

/// Arguments of `afo bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// What to measure.
    #[arg(value_enum, default_value = "speed")]
    mode: Mode,
    /// The model: a GGUF file.
    #[arg(long)]
    model: PathBuf,
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
    /// `prefix`: the text the prefix is cut from.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    text: PathBuf,
}

/// Time to first token of prompts that start with the same `--prefix-tokens` of
/// `--text` and end with a different question each round: cold (no prefix cache), the
/// first run with the prefix cache (a miss that publishes the prefix), and cached.
fn prefix(args: &Args, loaded: &LoadedModel) -> anyhow::Result<()> {
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
    let (cold, first, cached) = (median(cold), median(first), median(cached));
    let ratio = cached / cold;
    out!(
        "prefix {} tokens of {}, {} rounds, threads {}",
        prefix.len(),
        args.text.display(),
        rounds,
        rayon_threads()
    );
    out!("| run | TTFT (median) | vs cold |");
    out!("| --- | --- | --- |");
    out!("| cold (no prefix cache) | {cold:.1} ms | 100% |");
    out!(
        "| first with the prefix cache (miss, publishes) | {first:.1} ms | {:.1}% |",
        100.0 * first / cold
    );
    out!(
        "| cached ({hit} prefix tokens reused) | {cached:.1} ms | {:.1}% |",
        100.0 * ratio
    );
    out!(
        "publishing the prefix alone: {:.1} ms, seeding a cache from it: {:.1} ms (medians)",
        median(publish),
        median(seed)
    );
    out!(
        "cached / cold = {:.1}% (goal <= 20%: {})",
        100.0 * ratio,
        if ratio <= 0.2 { "met" } else { "not met" }
    );
    Ok(())
}

/// Aggregate decode speed of `n` sequences batched, for each `n`.
fn batch(args: &Args, loaded: &LoadedModel) -> anyhow::Result<()> {
    use afo_runtime::engine::{GenerateOptions, SamplingParams, Scheduler};
    let model = loaded.model();
    let vocab = model.config().vocab_size as u32;
    out!("| sequences | decode tok/s (all sequences) | per sequence | vs 1 sequence |");
    out!("| --- | --- | --- | --- |");
    let mut single = None;
    for &n in &args.concurrency {
        let mut rates = Vec::new();
        for _ in 0..args.rounds.max(1) {
            let mut s = Scheduler::new(model, loaded.tokenizer(), n);
            for i in 0..n as u32 {
                let prompt: Vec<u32> = (0..16).map(|j| (i * 7919 + j * 31 + 13) % vocab).collect();
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
            // The first step admits every sequence and runs the prompts.
            s.step()?;
            let t = Instant::now();
            let mut tokens = 0usize;
            while s.has_unfinished() {
                tokens += s.step()?.iter().filter(|o| o.token.is_some()).count();
            }
            rates.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
        let rate = median(rates);
        let base = *single.get_or_insert(rate);
        out!(
            "| {n} | {rate:.1} | {:.1} | {:.2}x |",
            rate / n as f64,
            rate / base
        );
    }
    Ok(())
}

/// Predicted against measured peak memory, one warm run per prompt length.
fn predict(args: &Args) -> anyhow::Result<()> {
    use afo_runtime::engine::{GenerateOptions, SamplingParams};
    use afo_runtime::guard::ByteSize;
    use afo_runtime::{GenerateRequest, Prompt};

    let runtime = Runtime::builder().build()?;
    let request = |prompt: String| {
        let mut r =
            GenerateRequest::new(&args.model, Prompt::Text(prompt)).with_options(GenerateOptions {
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
    out!("| prompt tokens | generated | predicted peak | measured peak | error |");
    out!("| --- | --- | --- | --- | --- |");
    for &n in &args.predict {
        // " the" is one token in GPT-2 style vocabularies.
        let r = runtime.generate(&request(" the".repeat(n)))?;
        let (p, m) = (r.predicted_peak_bytes as f64, r.peak_memory_bytes as f64);
        out!(
            "| {} | {} | {} | {} | {:+.1}% |",
            r.prompt_tokens,
            r.completion_tokens,
            ByteSize(r.predicted_peak_bytes),
            ByteSize(r.peak_memory_bytes),
            100.0 * (p - m) / m
        );
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
        let p = responses
            .iter()
            .map(|r| r.predicted_peak_bytes)
            .max()
            .unwrap_or(0);
        let m = responses
            .iter()
            .map(|r| r.peak_memory_bytes)
            .max()
            .unwrap_or(0);
        let degraded = responses
            .iter()
            .filter(|r| r.admission.decision != "admitted")
            .count();
        out!(
            "| {n} x {} | {} each | {} | {} | {:+.1}% |{}",
            responses.first().map_or(0, |r| r.prompt_tokens),
            args.generate,
            ByteSize(p),
            ByteSize(m),
            100.0 * (p as f64 - m as f64) / m as f64,
            if degraded > 0 {
                format!(" ({degraded} degraded)")
            } else {
                String::new()
            }
        );
    }
    // A chain: the tiny VLM describes the shipped sample image, the model summarises.
    let vlm = std::env::temp_dir().join(format!("afo-bench-vlm-{}", std::process::id()));
    afo_runtime::engine::TinyVlm::default().write(&vlm)?;
    let image = afo_runtime::ChainImage {
        name: "sample.jpg".into(),
        bytes: super::chain::SAMPLE_JPEG.to_vec(),
    };
    let mut chain = afo_runtime::ChainRequest::new(&vlm, vec![image], "Describe the image.");
    chain.llm = Some(args.model.clone());
    let result = runtime.chain(&chain);
    std::fs::remove_dir_all(&vlm)?;
    let r = result?;
    out!(
        "| chain (tiny VLM + summary) | {} + {} | {} | {} | {:+.1}% |",
        r.analysis_tokens.generated,
        r.summary_tokens.generated,
        ByteSize(r.predicted_peak_bytes),
        ByteSize(r.peak_memory_bytes),
        100.0 * (r.predicted_peak_bytes as f64 - r.peak_memory_bytes as f64)
            / r.peak_memory_bytes as f64
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if args.mode == Mode::Memory {
        return predict(args);
    }
    let runtime = Runtime::builder().build()?;
    let cold_ms = runtime.preload(&args.model)?.acquire_ms;
    let warm: Vec<f64> = (0..args.rounds.max(1) * 20)
        .map(|_| runtime.preload(&args.model).map(|p| p.acquire_ms))
        .collect::<Result<_, _>>()?;
    let warm_ms = median(warm);
    out!(
        "load: cold {cold_ms:.1} ms, warm re-acquire {:.4} ms (median), ratio {:.0}x",
        warm_ms,
        cold_ms / warm_ms
    );

    let loaded = match args.scheme {
        Some(s) => LoadedModel::load_quantized(
            &args.model,
            afo_runtime::quant::QuantPolicy::new(s),
            |_| {},
        )?,
        None => LoadedModel::load(&args.model)?,
    };
    if args.mode == Mode::Batching {
        return batch(args, &loaded);
    }
    if args.mode == Mode::Prefix {
        return prefix(args, &loaded);
    }
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
        let mut cache = model.new_cache(args.generate + 2);
        model.forward(&[next], &mut cache, Logits::Last)?;
        let t = Instant::now();
        for _ in 0..args.generate {
            let logits = model.forward(&[next], &mut cache, Logits::Last)?;
            next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        }
        tg.push(args.generate as f64 / t.elapsed().as_secs_f64());
    }
    out!(
        "prefill pp{}: {:.1} tok/s (median of {}), decode tg{}: {:.1} tok/s (median of {}), threads {}",
        args.prompt,
        median(pp),
        args.rounds,
        args.generate,
        median(tg),
        args.rounds,
        rayon_threads()
    );
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
}
