//! Images per second of `preprocess_batch` over files, for side-by-side runs against
//! the Hugging Face processor (`benches/compare_hf.py` drives both):
//!
//! ```sh
//! cargo run --release -p afo-image --example throughput -- THREADS REPS CONFIG FILE...
//! ```
//!
//! CONFIG is `qwen3-vl`, `qwen2-vl` or `qwen3-vl:MAX_PIXELS`; `RESAMPLER=simd` in the
//! environment picks the SIMD resampler. Prints one line per repetition and the median.

use std::time::Instant;

use afo_image::{BatchOptions, DecodeLimits, PreprocessorConfig, Resampler, preprocess_batch};
use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        bail!("usage: throughput THREADS REPS CONFIG FILE...");
    }
    let threads: usize = args[1].parse()?;
    let reps: usize = args[2].parse()?;
    let (name, max) = match args[3].split_once(':') {
        Some((n, m)) => (n, Some(m.parse::<usize>()?)),
        None => (args[3].as_str(), None),
    };
    let mut config = match name {
        "qwen3-vl" => PreprocessorConfig::qwen3_vl(),
        "qwen2-vl" => PreprocessorConfig::qwen2_vl(),
        other => bail!("unknown config {other}"),
    };
    if let Some(max) = max {
        config.max_pixels = max;
    }
    if std::env::var("RESAMPLER").is_ok_and(|r| r == "simd") {
        config = config.with_resampler(Resampler::Simd);
    }
    let files: Vec<Vec<u8>> = args[4..]
        .iter()
        .map(|f| std::fs::read(f).with_context(|| f.clone()))
        .collect::<Result<_>>()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut rates = Vec::new();
    for rep in 0..reps {
        let start = Instant::now();
        let results = pool.install(|| {
            preprocess_batch(
                &files,
                &config,
                &DecodeLimits::default(),
                &BatchOptions::default(),
            )
        });
        let secs = start.elapsed().as_secs_f64();
        for r in &results {
            if let Err(e) = r {
                bail!("{e}");
            }
        }
        let rate = files.len() as f64 / secs;
        println!(
            "rep {rep}: {} images in {secs:.3} s = {rate:.3} images/s",
            files.len()
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median {:.3} images/s (threads {threads})",
        rates[rates.len() / 2]
    );
    Ok(())
}
