//! Generate text with the runtime, streamed token by token, then the run's numbers:
//! `cargo run --example generate [PROMPT]`.
//!
//! Needs SmolLM2 in `models/` (`scripts/fetch-models.sh`). The run is admitted on the
//! runtime's memory ledger under an 8 GiB cutline and written to the examples' SSOT
//! log.

use std::io::Write as _;
use std::ops::ControlFlow;

use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

fn main() -> anyhow::Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Name three uses of the Rust language.".to_owned());
    let runtime = Runtime::builder()
        .cutline("8GiB".parse()?)
        .ssot_log(afo_examples::examples_log())
        .build()?;
    let request = GenerateRequest::new(
        afo_examples::smollm2()?,
        Prompt::Chat(vec![Message::user(prompt)]),
    )
    .with_options(GenerateOptions {
        max_tokens: 96,
        sampling: SamplingParams::builder()
            .temperature(0.3)
            .repetition_penalty(1.2)
            .build()?,
        ..GenerateOptions::default()
    });
    // Each text delta arrives as soon as it decodes; `ControlFlow::Break` would stop
    // the run (and still write its record).
    let response = runtime.generate_stream(&request, |delta| {
        print!("{delta}");
        let _ = std::io::stdout().flush();
        ControlFlow::Continue(())
    })?;
    println!(
        "\n\n{} prompt + {} generated tokens, {:.1} tok/s, first token after {:.0} ms",
        response.prompt_tokens,
        response.completion_tokens,
        response.tokens_per_s.unwrap_or(0.0),
        response.timings.ttft_ms.unwrap_or(0.0),
    );
    println!(
        "peak {:.1} MiB (predicted {:.1} MiB) under a {:.0} MiB cutline: {}",
        mib(response.peak_memory_bytes),
        mib(response.predicted_peak_bytes),
        mib(response.cutline_bytes),
        response.badge
    );
    anyhow::ensure!(
        response.completion_tokens > 0,
        "the model generated nothing"
    );
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}
