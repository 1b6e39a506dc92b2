//! The `afo` command-line tool.

use clap::Parser;

/// afo: run language and vision-language models locally, under a hard memory cutline.
#[derive(Debug, Parser)]
#[command(name = "afo", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
