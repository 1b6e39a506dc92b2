//! `afo eval perplexity`: perplexity of a model on a text file.

use std::path::PathBuf;
use std::time::Instant;

use afo_runtime::engine::{LoadedModel, perplexity};

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
    },
}

pub(crate) fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Perplexity { model, file, ctx } => {
            let loaded = LoadedModel::load(model)?;
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let tokens = loaded.tokenizer().encode(&text, false)?;
            eprintln!(
                "{} tokens, {} windows of {ctx}",
                tokens.len(),
                tokens.len() / ctx
            );
            let start = Instant::now();
            let p = perplexity(loaded.model(), &tokens, *ctx, |done, all, ppl| {
                eprint!("\r[{done}/{all}] {ppl:.4}");
            })?;
            eprintln!();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "perplexity {:.4} (nll {:.4}) over {} scored tokens in {} windows of {ctx}; {:.1} s, {:.0} tokens/s",
                p.ppl,
                p.nll,
                p.tokens_scored,
                p.windows,
                secs,
                (p.windows * ctx) as f64 / secs
            );
            Ok(())
        }
    }
}
