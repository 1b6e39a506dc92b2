//! Several logs summarised together, with a summary per log or per replica.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::badge::StatusBadge;
use crate::error::Result;
use crate::reader::{LogReader, ReadMode, Skipped};
use crate::record::Record;
use crate::summary::Summary;

/// What a part of a [`MergedSummary`] groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    /// The records of one log that name no replica, and the log's skipped lines.
    Log,
    /// The records naming one `replica_id`, from whichever logs hold them.
    Replica,
}

impl PartKind {
    /// `log` or `replica`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PartKind::Log => "log",
            PartKind::Replica => "replica",
        }
    }
}

impl fmt::Display for PartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The summary of one part of a [`MergedSummary`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartSummary {
    /// Whether the part is a log or a replica.
    pub by: PartKind,
    /// The log's path as given, or the replica id.
    pub id: String,
    /// The part's records. A replica's `skipped_lines` is 0: a skipped line cannot
    /// say which replica wrote it, so it is counted in its log's part.
    #[serde(flatten)]
    pub summary: Summary,
}

/// A line skipped in one of the merged logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedLine {
    /// The log it is in.
    pub log: PathBuf,
    /// The 1-based line number.
    pub line: usize,
    /// Why it was skipped.
    pub reason: String,
    /// Whether the line was torn (a record cut short by a crash mid-write).
    pub torn: bool,
}

/// Several logs summarised as one, with a breakdown.
///
/// `overall` is the [`Summary`] of every record of every log (percentiles over the
/// union, counts added, the worst badge of all). `parts` splits the records: a record
/// that names its `replica_id` goes to that replica's part, whichever log holds it;
/// any other record goes to its log's part. A log has a part unless every line of it
/// is a record naming a replica, so an empty log, or one whose lines were all skipped,
/// still shows. Parts come in the order they first appear.
///
/// Serialised, the overall summary's fields are at the top level (the shape of a
/// single [`Summary`]), with `parts` and `skipped` beside them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergedSummary {
    /// Every record of every log.
    #[serde(flatten)]
    pub overall: Summary,
    /// One summary per log or replica.
    pub parts: Vec<PartSummary>,
    /// Every skipped line, with its log.
    pub skipped: Vec<SkippedLine>,
}

impl MergedSummary {
    /// Summarises logs already read: for each, its path, its records and the lines
    /// its reader skipped.
    pub fn from_records<'a>(
        logs: impl IntoIterator<Item = (&'a Path, &'a [Record], &'a [Skipped])>,
    ) -> Self {
        let mut all: Vec<&Record> = Vec::new();
        let mut skipped = Vec::new();
        // (kind, id, records, skipped lines), in order of first appearance.
        let mut parts: Parts<'a> = Vec::new();
        for (path, records, skips) in logs {
            let log_id = path.display().to_string();
            // The log's own part, made when the first line needs it.
            let mut log_part = None;
            if records.is_empty() {
                own_part(&mut parts, &mut log_part, &log_id);
            }
            for record in records {
                all.push(record);
                let index = match replica_of(record) {
                    Some(replica) => part_index(&mut parts, PartKind::Replica, replica),
                    None => own_part(&mut parts, &mut log_part, &log_id),
                };
                if let Some(part) = parts.get_mut(index) {
                    part.2.push(record);
                }
            }
            if !skips.is_empty() {
                let index = own_part(&mut parts, &mut log_part, &log_id);
                if let Some(part) = parts.get_mut(index) {
                    part.3 += skips.len();
                }
            }
            skipped.extend(skips.iter().map(|s| SkippedLine {
                log: path.to_path_buf(),
                line: s.line,
                reason: s.reason.clone(),
                torn: s.torn,
            }));
        }
        Self {
            overall: Summary::from_records(all, skipped.len()),
            parts: parts
                .into_iter()
                .map(|(by, id, records, skipped)| PartSummary {
                    by,
                    id,
                    summary: Summary::from_records(records, skipped),
                })
                .collect(),
            skipped,
        }
    }

    /// Reads each log (skipping, and listing, malformed and torn lines) and
    /// summarises them together.
    ///
    /// # Errors
    /// [`crate::Error::Io`] naming the first log that cannot be opened or read.
    pub fn from_logs<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<Self> {
        let mut logs = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let mut reader = LogReader::open(path, ReadMode::Skip)?;
            let records: Vec<Record> = reader.read_all()?.into_iter().map(|e| e.record).collect();
            logs.push((path.to_path_buf(), records, reader.skipped().to_vec()));
        }
        Ok(Self::from_records(logs.iter().map(
            |(path, records, skipped)| (path.as_path(), records.as_slice(), skipped.as_slice()),
        )))
    }
}

fn replica_of(record: &Record) -> Option<&str> {
    match record {
        Record::V2(r) => r.replica_id.as_deref(),
        Record::V1(_) => None,
    }
}

/// Parts being gathered: kind, id, records, skipped lines.
type Parts<'a> = Vec<(PartKind, String, Vec<&'a Record>, usize)>;

/// The index of a log's own part, pushed (once) when first asked for.
fn own_part(parts: &mut Parts<'_>, slot: &mut Option<usize>, log_id: &str) -> usize {
    *slot.get_or_insert_with(|| {
        parts.push((PartKind::Log, log_id.to_owned(), Vec::new(), 0));
        parts.len() - 1
    })
}

fn part_index(parts: &mut Parts<'_>, kind: PartKind, id: &str) -> usize {
    match parts.iter().position(|p| p.0 == kind && p.1 == id) {
        Some(i) => i,
        None => {
            parts.push((kind, id.to_owned(), Vec::new(), 0));
            parts.len() - 1
        }
    }
}

impl fmt::Display for PartSummary {
    /// One line: what the part is, its counts, percentiles, tokens/s and worst badge.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        write!(
            f,
            "{} {}: {} record(s), {} error(s)",
            self.by, self.id, s.count, s.errors
        )?;
        if let Some(p) = s.latency_ms {
            write!(
                f,
                ", p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
                p.p50, p.p95, p.p99
            )?;
        }
        if let Some(t) = s.mean_tokens_per_s {
            write!(f, ", {t:.2} tokens/s")?;
        }
        write!(
            f,
            ", worst badge {}",
            s.worst_badge.map_or("-", StatusBadge::as_str)
        )?;
        if s.skipped_lines > 0 {
            write!(f, ", {} line(s) skipped", s.skipped_lines)?;
        }
        Ok(())
    }
}

impl fmt::Display for MergedSummary {
    /// The overall summary as [`Summary`] prints it, then, when there is more than
    /// one part or a replica, one line per part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.overall)?;
        let replicas = self.parts.iter().any(|p| p.by == PartKind::Replica);
        if self.parts.len() > 1 || replicas {
            write!(
                f,
                "\nby {}",
                if replicas { "replica or log" } else { "log" }
            )?;
            for part in &self.parts {
                write!(f, "\n  {part}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordV1, RecordV2, RunStatus};

    fn record(
        latency_ms: f64,
        status: RunStatus,
        badge: Option<StatusBadge>,
        replica: Option<&str>,
    ) -> Record {
        let mut r = RecordV2::new(RecordV1 {
            schema_version: 2,
            ts: "2026-11-23T22:41:07Z".parse().unwrap(),
            run_id: format!("run-{latency_ms}"),
            chain: "generate".into(),
            model_id: "m".into(),
            error: (status == RunStatus::Error).then(|| "boom".to_owned()),
            status,
            latency_ms,
            peak_memory_bytes: 1 << 20,
            cutline_bytes: 1 << 30,
            tokens_in: 4,
            tokens_out: 8,
            tokens_per_s: latency_ms,
        });
        r.status_badge = badge;
        r.replica_id = replica.map(str::to_owned);
        r.into()
    }

    fn skip(line: usize) -> Skipped {
        Skipped {
            line,
            reason: "expected value".into(),
            torn: false,
        }
    }

    #[test]
    fn two_logs_add_up_and_percentiles_span_the_union() {
        // a: latencies 1..=10, one error, SAFE; b: 91..=100, WARN, one skipped line.
        let a: Vec<Record> = (1..=10)
            .map(|i| {
                let status = if i == 3 {
                    RunStatus::Error
                } else {
                    RunStatus::Ok
                };
                record(f64::from(i), status, Some(StatusBadge::Safe), None)
            })
            .collect();
        let b: Vec<Record> = (91..=100)
            .map(|i| record(f64::from(i), RunStatus::Ok, Some(StatusBadge::Warn), None))
            .collect();
        let b_skipped = [skip(4)];
        let merged = MergedSummary::from_records([
            (Path::new("a.jsonl"), a.as_slice(), &[][..]),
            (Path::new("b.jsonl"), b.as_slice(), &b_skipped[..]),
        ]);
        let all = &merged.overall;
        assert_eq!(all.count, 20);
        assert_eq!(all.errors, 1);
        assert_eq!(all.versions, [0, 20]);
        assert_eq!(all.skipped_lines, 1);
        // Nearest rank over the 20 latencies 1..=10, 91..=100: the 10th is 10, the
        // 19th is 99, the 20th is 100. Neither log's own p50 (5 and 95) is this.
        let p = all.latency_ms.unwrap();
        assert_eq!((p.p50, p.p95, p.p99), (10.0, 99.0, 100.0));
        assert_eq!(all.worst_badge, Some(StatusBadge::Warn));

        assert_eq!(merged.parts.len(), 2);
        let (pa, pb) = (&merged.parts[0], &merged.parts[1]);
        assert_eq!((pa.by, pa.id.as_str()), (PartKind::Log, "a.jsonl"));
        assert_eq!((pb.by, pb.id.as_str()), (PartKind::Log, "b.jsonl"));
        assert_eq!((pa.summary.count, pa.summary.errors), (10, 1));
        assert_eq!(pa.summary.latency_ms.unwrap().p50, 5.0);
        assert_eq!(pa.summary.worst_badge, Some(StatusBadge::Safe));
        assert_eq!(pa.summary.skipped_lines, 0);
        assert_eq!(pb.summary.latency_ms.unwrap().p50, 95.0);
        assert_eq!(pb.summary.worst_badge, Some(StatusBadge::Warn));
        assert_eq!(pb.summary.skipped_lines, 1);
        assert_eq!(
            merged.skipped,
            vec![SkippedLine {
                log: "b.jsonl".into(),
                line: 4,
                reason: "expected value".into(),
                torn: false,
            }]
        );
        // The worst badge is the worst of both, whichever log holds it.
        let swapped = MergedSummary::from_records([
            (Path::new("b.jsonl"), b.as_slice(), &[][..]),
            (Path::new("a.jsonl"), a.as_slice(), &[][..]),
        ]);
        assert_eq!(swapped.overall.worst_badge, Some(StatusBadge::Warn));
        assert_eq!(swapped.overall.latency_ms, all.latency_ms);
    }

    #[test]
    fn records_naming_a_replica_are_grouped_by_it_across_logs() {
        let a = [
            record(1.0, RunStatus::Ok, None, Some("r1")),
            record(
                2.0,
                RunStatus::Ok,
                Some(StatusBadge::OverCutline),
                Some("r2"),
            ),
        ];
        let b = [
            record(3.0, RunStatus::Ok, None, Some("r1")),
            record(4.0, RunStatus::Ok, None, None),
        ];
        let merged = MergedSummary::from_records([
            (Path::new("a.jsonl"), &a[..], &[][..]),
            (Path::new("b.jsonl"), &b[..], &[][..]),
        ]);
        let parts: Vec<(PartKind, &str, usize)> = merged
            .parts
            .iter()
            .map(|p| (p.by, p.id.as_str(), p.summary.count))
            .collect();
        assert_eq!(
            parts,
            [
                (PartKind::Replica, "r1", 2),
                (PartKind::Replica, "r2", 1),
                (PartKind::Log, "b.jsonl", 1),
            ]
        );
        assert_eq!(merged.overall.count, 4);
        assert_eq!(merged.overall.worst_badge, Some(StatusBadge::OverCutline));
        let text = merged.to_string();
        assert!(text.contains("by replica or log"), "{text}");
        assert!(text.contains("replica r1: 2 record(s)"), "{text}");
        assert!(text.contains("log b.jsonl: 1 record(s)"), "{text}");
    }

    #[test]
    fn one_log_prints_as_a_single_summary_and_serialises_flat() {
        let a = [record(5.0, RunStatus::Ok, None, None)];
        let merged = MergedSummary::from_records([(Path::new("a.jsonl"), &a[..], &[][..])]);
        let single = Summary::from_records(&a, 0);
        assert_eq!(merged.overall, single);
        assert_eq!(merged.to_string(), single.to_string());
        let json = serde_json::to_value(&merged).unwrap();
        assert_eq!(json["count"], 1);
        assert_eq!(json["parts"][0]["by"], "log");
        assert_eq!(json["parts"][0]["id"], "a.jsonl");
        assert_eq!(json["parts"][0]["count"], 1);
        assert_eq!(json["skipped"], serde_json::json!([]));
    }

    #[test]
    fn an_empty_log_still_has_its_part() {
        let a = [record(5.0, RunStatus::Ok, None, Some("r1"))];
        let merged = MergedSummary::from_records([
            (Path::new("a.jsonl"), &a[..], &[][..]),
            (Path::new("empty.jsonl"), &[][..], &[][..]),
        ]);
        assert_eq!(merged.parts.len(), 2);
        assert_eq!(merged.parts[1].id, "empty.jsonl");
        assert_eq!(merged.parts[1].summary.count, 0);
    }
}
