//! Generate text with the runtime: `cargo run --release -p afo-runtime --example generate`.
//!
//! Needs the SmolLM2 model in `models/` (`scripts/fetch-models.sh`).

use std::ops::ControlFlow;

use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

fn main() -> anyhow::Result<()> {
    let runtime = Runtime::builder().ssot_log("logs/example.jsonl").build()?;
    let request = GenerateRequest::new(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        Prompt::Chat(vec![Message::user("Name three uses of the Rust language.")]),
    )
    .with_options(GenerateOptions {
        max_tokens: 96,
        sampling: SamplingParams::builder().repetition_penalty(1.2).build()?,
        ..GenerateOptions::default()
    });
    let response = runtime.generate_stream(&request, |delta| {
        print!("{delta}");
        ControlFlow::Continue(())
    })?;
    println!(
        "\n\n{} tokens, {:.1} tok/s, peak {} bytes ({})",
        response.completion_tokens,
        response.tokens_per_s.unwrap_or(0.0),
        response.peak_memory_bytes,
        response.badge
    );
    Ok(())
}
