//! A chat loop with history: `cargo run --example chat`.
//!
//! Type a message per line (an empty line or end of input ends the chat). Every turn
//! sends the whole conversation so far, rendered with the model's own chat template;
//! the runtime's prefix cache (on by default) reuses the keys and values of the turns already seen,
//! so each turn prefills only what is new (the `cached` figure). Piped input works
//! too: `printf 'Hi!\nWhat did I say?\n' | cargo run --example chat`.

use std::io::{BufRead as _, Write as _};
use std::ops::ControlFlow;

use afo_runtime::engine::{GenerateOptions, Message, SamplingParams};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

fn main() -> anyhow::Result<()> {
    let model = afo_examples::smollm2()?;
    let runtime = Runtime::builder()
        .ssot_log(afo_examples::examples_log())
        .build()?;
    let mut history = vec![Message::system(
        "You are a helpful assistant. Answer in one or two sentences.",
    )];
    let stdin = std::io::stdin();
    let mut turns = 0;
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        history.push(Message::user(line.trim()));
        let request = GenerateRequest::new(&model, Prompt::Chat(history.clone())).with_options(
            GenerateOptions {
                max_tokens: 64,
                sampling: SamplingParams::builder()
                    .temperature(0.3)
                    .repetition_penalty(1.2)
                    .build()?,
                ..GenerateOptions::default()
            },
        );
        print!("afo> ");
        let response = runtime.generate_stream(&request, |delta| {
            print!("{delta}");
            let _ = std::io::stdout().flush();
            ControlFlow::Continue(())
        })?;
        println!(
            "\n     [{} prompt tokens, {} cached, {} generated, {:.1} tok/s]",
            response.prompt_tokens,
            response.prefix_cache_hit_tokens,
            response.completion_tokens,
            response.tokens_per_s.unwrap_or(0.0)
        );
        history.push(Message::assistant(response.text));
        turns += 1;
    }
    println!("{turns} turns, {} messages in the history", history.len());
    Ok(())
}
