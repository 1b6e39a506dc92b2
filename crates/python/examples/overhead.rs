//! The Rust side of the Python package's overhead measurement
//! (`benches/overhead.py`): `ROUNDS` greedy 64-token generations of one prompt on a
//! warm model with `Runtime::generate`, each round's wall time printed in
//! milliseconds, one per line.
//!
//! `cargo run --release -p afo-python --example overhead -- MODEL [ROUNDS]`

use std::time::Instant;

use afo_runtime::engine::{GenerateOptions, SamplingParams};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

/// The prompt `benches/overhead.py` uses too.
const PROMPT: &str = "The history of the printing press";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: overhead MODEL [ROUNDS]"))?;
    let rounds: usize = args.next().map_or(Ok(10), |r| r.parse())?;
    let runtime = Runtime::builder().cutline("8GiB".parse()?).build()?;
    let request = GenerateRequest::new(&model, Prompt::Text(PROMPT.to_owned())).with_options(
        GenerateOptions {
            max_tokens: 64,
            sampling: SamplingParams::greedy(),
            ignore_eos: true,
            ..GenerateOptions::default()
        },
    );
    // Warm: the model loaded, the prefix cache holding the prompt.
    runtime.generate(&request)?;
    for _ in 0..rounds {
        let start = Instant::now();
        let r = runtime.generate(&request)?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(r.completion_tokens == 64, "{} tokens", r.completion_tokens);
        println!("{wall:.3}");
    }
    Ok(())
}
