//! Summaries of a log: counts, error rate, latency percentiles, throughput, badges.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::badge::StatusBadge;
use crate::error::Result;
use crate::reader::{LogReader, ReadMode};
use crate::record::{Record, RunStatus};

/// Latency percentiles by the nearest-rank method, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// What a log says, in a few numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Records read.
    pub count: usize,
    /// Records with `status = error`.
    pub errors: usize,
    /// `errors / count`; `None` for an empty log.
    pub error_rate: Option<f64>,
    /// Latency percentiles over every record.
    pub latency_ms: Option<Percentiles>,
    /// Mean `tokens_per_s` over successful runs that generated tokens.
    pub mean_tokens_per_s: Option<f64>,
    /// Lazy model cache hits over acquires: a v2 run with `reload_overhead_ms` is a
    /// hit, one with `load_ms` a miss.
    pub cache_hit_rate: Option<f64>,
    /// The worst `status_badge` seen (v2 records only).
    pub worst_badge: Option<StatusBadge>,
    /// Records per schema version: `[v1, v2]`.
    pub versions: [usize; 2],
    /// Lines skipped as malformed or torn.
    pub skipped_lines: usize,
}

impl Summary {
    /// Summarises records.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a Record>, skipped: usize) -> Self {
        let mut latencies = Vec::new();
        let (mut count, mut errors, mut versions) = (0, 0, [0usize; 2]);
        let (mut tps_sum, mut tps_n) = (0.0, 0usize);
        let (mut hits, mut misses) = (0usize, 0usize);
        let mut worst_badge = None;
        for record in records {
            count += 1;
            let v1 = record.v1();
            latencies.push(v1.latency_ms);
            if v1.status == RunStatus::Error {
                errors += 1;
            } else if v1.tokens_out > 0 {
                tps_sum += v1.tokens_per_s;
                tps_n += 1;
            }
            match record {
                Record::V1(_) => versions[0] += 1,
                Record::V2(r) => {
                    versions[1] += 1;
                    if r.reload_overhead_ms.is_some() {
                        hits += 1;
                    } else if r.load_ms.is_some() {
                        misses += 1;
                    }
                    worst_badge = worst_badge.max(r.status_badge);
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        Self {
            count,
            errors,
            error_rate: (count > 0).then(|| errors as f64 / count as f64),
            latency_ms: (!latencies.is_empty()).then(|| Percentiles {
                p50: nearest_rank(&latencies, 50.0),
                p95: nearest_rank(&latencies, 95.0),
                p99: nearest_rank(&latencies, 99.0),
            }),
            mean_tokens_per_s: (tps_n > 0).then(|| tps_sum / tps_n as f64),
            cache_hit_rate: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            worst_badge,
            versions,
            skipped_lines: skipped,
        }
    }

    /// Reads and summarises a log file, skipping (and counting) malformed and torn
    /// lines.
    ///
    /// # Errors
    /// When the file cannot be opened or read.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let mut reader = LogReader::open(path, ReadMode::Skip)?;
        let entries = reader.read_all()?;
        Ok(Self::from_records(
            entries.iter().map(|e| &e.record),
            reader.skipped().len(),
        ))
    }
}

/// The nearest-rank percentile of sorted values: the smallest value with at least
/// `p` percent of the values at or below it.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, n.max(1)) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<f64>, unit: &str| match v {
            Some(v) => format!("{v:.2}{unit}"),
            None => "-".to_owned(),
        };
        writeln!(
            f,
            "records        {} (v1 {}, v2 {}), {} line(s) skipped",
            self.count, self.versions[0], self.versions[1], self.skipped_lines
        )?;
        writeln!(
            f,
            "errors         {} ({})",
            self.errors,
            opt(self.error_rate.map(|r| r * 100.0), "%")
        )?;
        match self.latency_ms {
            Some(p) => writeln!(
                f,
                "latency        p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
                p.p50, p.p95, p.p99
            )?,
            None => writeln!(f, "latency        -")?,
        }
        writeln!(
            f,
            "tokens/s       {}",
            opt(self.mean_tokens_per_s, " (mean)")
        )?;
        writeln!(
            f,
            "cache hit rate {}",
            opt(self.cache_hit_rate.map(|r| r * 100.0), "%")
        )?;
        write!(
            f,
            "worst badge    {}",
            self.worst_badge.map_or("-", StatusBadge::as_str)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 50.0), 50.0);
        assert_eq!(nearest_rank(&v, 95.0), 95.0);
        assert_eq!(nearest_rank(&v, 99.0), 99.0);
        assert_eq!(nearest_rank(&[7.0], 99.0), 7.0);
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }
}
