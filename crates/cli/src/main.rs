//! The `afo` command-line tool.

mod cmd;

use clap::{Parser, Subcommand};

/// afo: run language and vision-language models locally, under a hard memory cutline.
#[derive(Debug, Parser)]
#[command(name = "afo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the JSON Schema of an SSOT record version.
    Schema(cmd::schema::Args),
    /// Work with SSOT monitoring logs.
    Ssot {
        #[command(subcommand)]
        command: cmd::ssot::Command,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Schema(args) => cmd::schema::run(&args),
        Command::Ssot { command } => cmd::ssot::run(&command),
    }
}
