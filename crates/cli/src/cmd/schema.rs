//! `afo schema`: print the JSON Schema of an SSOT record version.

use afo_runtime::ssot::{SchemaVersion, json_schema};

/// Arguments of `afo schema`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The record version: 1 or 2.
    #[arg(long, default_value = "2")]
    version: SchemaVersion,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    print!("{}", json_schema(args.version));
    Ok(())
}
