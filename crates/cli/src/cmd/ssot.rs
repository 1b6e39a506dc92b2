//! `afo ssot ...`: read SSOT monitoring logs.

use std::path::PathBuf;

use afo_runtime::ssot::MergedSummary;

/// Subcommands of `afo ssot`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Summarise one log or several taken together (the logs of a deployment's
    /// replicas): count, error rate, latency percentiles, tokens/s, cache hit rate,
    /// worst badge over every record, then a line per log, or per replica for records
    /// that name one. Malformed and torn lines are reported on stderr with their log
    /// and skipped.
    Summary {
        /// The JSONL logs.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Print the summary as JSON: the overall summary's fields, `parts` (one
        /// summary per log or replica) and `skipped` (each skipped line with its log).
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Summary { logs, json } => {
            let merged = MergedSummary::from_logs(logs)?;
            for skipped in &merged.skipped {
                eprintln!(
                    "{}:{}: skipped{}: {}",
                    skipped.log.display(),
                    skipped.line,
                    if skipped.torn {
                        " (torn last line)"
                    } else {
                        ""
                    },
                    skipped.reason
                );
            }
            if *json {
                out!("{}", serde_json::to_string_pretty(&merged)?);
            } else {
                out!("{merged}");
            }
            Ok(())
        }
    }
}
