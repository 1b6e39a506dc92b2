//! `afo ssot ...`: read SSOT monitoring logs.

use std::path::PathBuf;

use afo_runtime::ssot::{LogReader, ReadMode, Summary};
use anyhow::Context;

/// Subcommands of `afo ssot`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Summarise a log: count, error rate, latency percentiles, tokens/s, cache hit
    /// rate, worst badge. Malformed and torn lines are reported on stderr and skipped.
    Summary {
        /// The JSONL log.
        log: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Summary { log, json } => {
            let mut reader = LogReader::open(log, ReadMode::Skip)?;
            let entries = reader
                .read_all()
                .with_context(|| format!("reading {}", log.display()))?;
            for skipped in reader.skipped() {
                eprintln!(
                    "{}:{}: skipped{}: {}",
                    log.display(),
                    skipped.line,
                    if skipped.torn {
                        " (torn last line)"
                    } else {
                        ""
                    },
                    skipped.reason
                );
            }
            let summary =
                Summary::from_records(entries.iter().map(|e| &e.record), reader.skipped().len());
            if *json {
                out!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                out!("{summary}");
            }
            Ok(())
        }
    }
}
