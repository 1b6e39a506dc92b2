//! Reading committed fixture logs: v1 only, mixed v1/v2, a torn last line, malformed
//! lines; compatibility both ways; concurrent writers; the committed JSON Schema.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afo_ssot::{
    Durability, Error, JsonlWriter, LogReader, ReadMode, Record, RecordV1, RecordV2, RunStatus,
    SchemaVersion, StatusBadge, Summary, Timestamp, json_schema,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Timestamps are compared as instants: `.250Z` and `.25Z` are the same time.
fn normalise_ts(value: &mut serde_json::Value) {
    let ts: Timestamp = value["ts"].as_str().unwrap().parse().unwrap();
    value["ts"] = ts.to_string().into();
}

fn lines(name: &str) -> Vec<String> {
    std::fs::read_to_string(fixture(name))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_v1_log_reads_back_losslessly() {
    let entries = LogReader::open(fixture("v1.jsonl"), ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(entries.len(), 3);
    for (entry, line) in entries.iter().zip(lines("v1.jsonl")) {
        assert_eq!(entry.record.version(), SchemaVersion::V1);
        // Lossless: re-serialising gives the same JSON value as the committed line.
        let again: serde_json::Value =
            serde_json::from_str(&entry.record.to_json().unwrap()).unwrap();
        let original: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(again, original);
        // Upgraded to v2: v1 fields intact, new fields absent.
        let up = entry.record.clone().into_v2();
        assert_eq!(&up.base, entry.record.v1());
        assert!(up.ttft_ms.is_none() && up.status_badge.is_none() && up.selection.is_none());
    }
    assert_eq!(entries[2].record.v1().status, RunStatus::Error);
    assert_eq!(
        entries[2].record.v1().error.as_deref(),
        Some("context length exceeded")
    );
}

#[test]
fn a_mixed_log_reads_back_losslessly() {
    let entries = LogReader::open(fixture("mixed.jsonl"), ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    let versions: Vec<_> = entries.iter().map(|e| e.record.version()).collect();
    assert_eq!(
        versions,
        [
            SchemaVersion::V1,
            SchemaVersion::V2,
            SchemaVersion::V2,
            SchemaVersion::V1
        ]
    );
    // Line numbers count the blank line.
    assert_eq!(
        entries.iter().map(|e| e.line).collect::<Vec<_>>(),
        [1, 2, 4, 5]
    );
    let Record::V2(b2) = &entries[2].record else {
        panic!("v2 expected")
    };
    assert_eq!(b2.status_badge, Some(StatusBadge::Warn));
    let sel = b2.selection.as_ref().unwrap();
    assert_eq!(sel.fallback_from.as_deref(), Some("qwen3-vl-4b"));
    assert_eq!(b2.stages.as_ref().unwrap().len(), 2);
    // Lossless for every known field; unknown future fields are ignored.
    for (entry, line) in entries.iter().zip(lines("mixed.jsonl")) {
        let mut original: serde_json::Value = serde_json::from_str(&line).unwrap();
        original.as_object_mut().unwrap().remove("a_future_field");
        normalise_ts(&mut original);
        let again: serde_json::Value =
            serde_json::from_str(&entry.record.to_json().unwrap()).unwrap();
        assert_eq!(again, original, "line {}", entry.line);
    }
}

#[test]
fn a_v1_consumer_reads_v2_lines_unchanged() {
    // A v1 consumer: deserialises into the v1 type and ignores unknown fields.
    for line in lines("mixed.jsonl") {
        let as_v1: RecordV1 = serde_json::from_str(&line).unwrap();
        let full = Record::from_json(&line).unwrap();
        assert_eq!(&as_v1, full.v1());
        let raw: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(raw["latency_ms"].as_f64().unwrap(), as_v1.latency_ms);
        assert_eq!(
            raw["peak_memory_bytes"].as_u64().unwrap(),
            as_v1.peak_memory_bytes
        );
    }
}

#[test]
fn a_torn_last_line_is_skipped_and_hides_nothing() {
    for mode in [ReadMode::Skip, ReadMode::Strict] {
        let mut reader = LogReader::open(fixture("torn.jsonl"), mode).unwrap();
        let entries = reader.read_all().unwrap();
        assert_eq!(entries.len(), 4, "every complete record, mode {mode:?}");
        let skipped = reader.skipped();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].torn);
        assert_eq!(skipped[0].line, 6);
    }
}

#[test]
fn malformed_lines_are_skipped_or_fatal_by_choice() {
    let mut reader = LogReader::open(fixture("malformed.jsonl"), ReadMode::Skip).unwrap();
    let entries = reader.read_all().unwrap();
    assert_eq!(entries.iter().map(|e| e.line).collect::<Vec<_>>(), [1, 4]);
    let skipped = reader.skipped();
    assert_eq!(skipped.iter().map(|s| s.line).collect::<Vec<_>>(), [2, 3]);
    assert!(
        skipped[1].reason.contains("health_score"),
        "{}",
        skipped[1].reason
    );
    assert!(!skipped[0].torn);

    let err = LogReader::open(fixture("malformed.jsonl"), ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap_err();
    match err {
        Error::Malformed { line, .. } => assert_eq!(line, 2),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn summary_of_the_mixed_log() {
    let s = Summary::from_path(fixture("torn.jsonl")).unwrap();
    assert_eq!(s.count, 4);
    assert_eq!(s.versions, [2, 2]);
    assert_eq!(s.skipped_lines, 1);
    assert_eq!(s.errors, 0);
    assert_eq!(s.worst_badge, Some(StatusBadge::Warn));
    assert_eq!(s.cache_hit_rate, Some(0.5));
    let p = s.latency_ms.unwrap();
    assert_eq!((p.p50, p.p95, p.p99), (300.0, 1520.5, 1520.5));
    let mean = s.mean_tokens_per_s.unwrap();
    assert!((mean - (31.2 + 120.0 + 100.0 + 90.0) / 4.0).abs() < 1e-9);
    let v1 = Summary::from_path(fixture("v1.jsonl")).unwrap();
    assert_eq!(v1.errors, 1);
    assert!((v1.error_rate.unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(v1.worst_badge, None);
}

fn record(run: usize) -> Record {
    let mut r = RecordV2::new(RecordV1 {
        schema_version: 2,
        ts: Timestamp::now(),
        run_id: format!("run-{run}-{}", "x".repeat(run % 300)),
        chain: "generate".into(),
        model_id: "m".into(),
        status: RunStatus::Ok,
        error: None,
        latency_ms: run as f64,
        peak_memory_bytes: 1,
        cutline_bytes: 2,
        tokens_in: 1,
        tokens_out: 1,
        tokens_per_s: 1.0,
    });
    r.health_score = Some(90.0);
    Record::from(r)
}

#[test]
fn concurrent_writers_never_interleave_and_never_truncate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/log.jsonl");
    // An existing line survives opening the log again.
    JsonlWriter::open(&path, Durability::SyncData)
        .unwrap()
        .append(&record(0))
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            // Separate writers (separate file descriptions), as separate processes have.
            let writer = Arc::new(JsonlWriter::open(&path, Durability::OsBuffered).unwrap());
            std::thread::spawn(move || {
                for i in 0..200 {
                    writer.append(&record(1 + t * 1000 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut reader = LogReader::open(&path, ReadMode::Strict).unwrap();
    let entries = reader.read_all().unwrap();
    assert_eq!(entries.len(), 801);
    assert!(reader.skipped().is_empty());
    assert_eq!(entries[0].record.v1().run_id, "run-0-");
}

#[test]
fn the_writer_refuses_invalid_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.jsonl");
    let writer = JsonlWriter::open(&path, Durability::OsBuffered).unwrap();
    let Record::V2(mut bad) = record(1) else {
        unreachable!()
    };
    bad.lazy_cache_hit_rate = Some(2.0);
    let err = writer.append(&Record::V2(bad)).unwrap_err();
    assert!(err.to_string().contains("lazy_cache_hit_rate"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
}

#[test]
fn the_committed_json_schemas_match_the_code() {
    for (version, file) in [
        (SchemaVersion::V1, "ssot-v1.schema.json"),
        (SchemaVersion::V2, "ssot-v2.schema.json"),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs/schema")
            .join(file);
        let generated = json_schema(version);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from the schema the code generates; regenerate it with\n  \
             cargo run -q -p afo-cli -- schema --version {} > docs/schema/{file}",
            path.display(),
            version.number()
        );
    }
}

#[test]
fn the_v2_schema_names_every_field() {
    let schema: serde_json::Value = serde_json::from_str(&json_schema(SchemaVersion::V2)).unwrap();
    let text = schema.to_string();
    for field in [
        "schema_version",
        "ts",
        "run_id",
        "chain",
        "model_id",
        "status",
        "error",
        "latency_ms",
        "peak_memory_bytes",
        "cutline_bytes",
        "tokens_in",
        "tokens_out",
        "tokens_per_s",
        "lazy_cache_hit_rate",
        "reload_overhead_ms",
        "image_pixels",
        "compression_ratio",
        "token_budget",
        "kv_cache_size",
        "status_badge",
        "health_score",
        "predicted_peak_bytes",
        "quant_scheme",
        "selection",
        "fallback_from",
        "ttft_ms",
        "prefix_cache_hit_tokens",
        "kv_evicted_tokens",
        "stages",
        "admission",
        "unaccounted_bytes",
        "replica_id",
        "node_id",
    ] {
        assert!(
            text.contains(&format!("\"{field}\"")),
            "v2 schema lacks `{field}`"
        );
    }
}

#[test]
fn reopening_a_torn_log_keeps_the_next_record_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.jsonl");
    // The fixture's complete lines, then a record cut mid-write (a crash).
    let whole = lines("mixed.jsonl");
    let torn = &whole[0][..whole[0].len() / 2];
    std::fs::write(&path, format!("{}\n{}\n{torn}", whole[0], whole[1])).unwrap();

    let record = Record::from_json(&whole[2]).unwrap();
    let writer = JsonlWriter::open(&path, Durability::OsBuffered).unwrap();
    writer.append(&record).unwrap();
    drop(writer);
    // Opening a log that ends in a newline adds nothing.
    let before = std::fs::read(&path).unwrap();
    drop(JsonlWriter::open(&path, Durability::OsBuffered).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), before);

    for mode in [ReadMode::Skip, ReadMode::Strict] {
        let mut reader = LogReader::open(&path, mode).unwrap();
        let entries = reader.read_all().unwrap();
        assert_eq!(
            entries.iter().map(|e| e.line).collect::<Vec<_>>(),
            [1, 2, 4],
            "mode {mode:?}: both old records and the new one"
        );
        assert_eq!(entries[2].record, record);
        let skipped = reader.skipped();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].line, 3);
        assert!(skipped[0].torn, "a record cut short is torn, not malformed");
    }
}
