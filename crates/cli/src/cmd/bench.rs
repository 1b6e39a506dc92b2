//! `afo bench`: prefill and decode speed of a model, and cold load vs warm re-acquire.

use std::path::PathBuf;
use std::time::Instant;

use afo_runtime::Runtime;
use afo_runtime::engine::{LoadedModel, Logits};

/// Arguments of `afo bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
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
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let runtime = Runtime::builder().build()?;
    let (_, cold_ms) = runtime.preload(&args.model)?;
    let warm: Vec<f64> = (0..args.rounds.max(1) * 20)
        .map(|_| runtime.preload(&args.model).map(|(_, ms)| ms))
        .collect::<Result<_, _>>()?;
    let warm_ms = median(warm);
    println!(
        "load: cold {cold_ms:.1} ms, warm re-acquire {:.4} ms (median), ratio {:.0}x",
        warm_ms,
        cold_ms / warm_ms
    );

    let loaded = LoadedModel::load(&args.model)?;
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
    println!(
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
