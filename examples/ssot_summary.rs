//! Read and summarise an SSOT monitoring log: `cargo run --example ssot_summary [LOG]`
//! (default: the log the other examples append to, `logs/examples.jsonl`).
//!
//! Every run of the runtime writes one JSON line (schema v2: latency, tokens, peak
//! memory against the cutline, badge, the predicted peak, the model selection...).
//! The reader skips torn or malformed lines and says where they were; `Summary` gives
//! the figures `afo ssot summary` prints. Then a per-model table, computed here from
//! the records, shows how to go past the summary.

use std::collections::BTreeMap;

use afo_runtime::ssot::{LogReader, ReadMode, RunStatus, Summary};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .map_or_else(afo_examples::examples_log, std::path::PathBuf::from);
    let mut reader = LogReader::open(&path, ReadMode::Skip).map_err(|e| {
        anyhow::anyhow!("{e} (run another example first, e.g. `cargo run --example generate`)")
    })?;
    let entries = reader.read_all()?;
    for skipped in reader.skipped() {
        println!(
            "{}:{}: skipped: {}",
            path.display(),
            skipped.line,
            skipped.reason
        );
    }
    let summary = Summary::from_records(entries.iter().map(|e| &e.record), reader.skipped().len());
    println!("{}\n", path.display());
    println!("{summary}\n");

    // Per model: runs, errors, mean tokens/s, and the worst measured peak against the
    // peak the guard predicted for that run.
    #[derive(Default)]
    struct PerModel {
        runs: usize,
        errors: usize,
        tps: Vec<f64>,
        worst_peak: u64,
        predicted_at_worst: Option<u64>,
    }
    let mut models: BTreeMap<String, PerModel> = BTreeMap::new();
    for entry in &entries {
        let v2 = entry.record.clone().into_v2();
        let base = &v2.base;
        let m = models.entry(base.model_id.clone()).or_default();
        m.runs += 1;
        if base.status == RunStatus::Error {
            m.errors += 1;
        } else if base.tokens_out > 0 {
            m.tps.push(base.tokens_per_s);
        }
        if base.peak_memory_bytes >= m.worst_peak {
            m.worst_peak = base.peak_memory_bytes;
            m.predicted_at_worst = v2.predicted_peak_bytes;
        }
    }
    println!(
        "{:<40} {:>5} {:>6} {:>8} {:>14} {:>14}",
        "model", "runs", "errors", "tok/s", "worst peak MiB", "predicted MiB"
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    for (id, m) in &models {
        let tps = if m.tps.is_empty() {
            0.0
        } else {
            m.tps.iter().sum::<f64>() / m.tps.len() as f64
        };
        println!(
            "{:<40} {:>5} {:>6} {:>8.1} {:>14.1} {:>14}",
            id,
            m.runs,
            m.errors,
            tps,
            mib(m.worst_peak),
            m.predicted_at_worst
                .map_or_else(|| "-".to_owned(), |p| format!("{:.1}", mib(p)))
        );
    }
    anyhow::ensure!(summary.count > 0, "{} holds no records", path.display());
    Ok(())
}
