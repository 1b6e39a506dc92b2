//! Property test: any valid v2 record survives a write and a read unchanged.

#![allow(clippy::unwrap_used)]

use afo_ssot::{
    Durability, JsonlWriter, LogReader, ReadMode, Record, RecordV1, RecordV2, RunStatus, Selection,
    StatusBadge, Timestamp,
};
use proptest::prelude::*;

fn badge() -> impl Strategy<Value = StatusBadge> {
    prop_oneof![
        Just(StatusBadge::Safe),
        Just(StatusBadge::Warn),
        Just(StatusBadge::OverCutline)
    ]
}

prop_compose! {
    fn record()(
        secs in 0i64..4_000_000_000,
        run_id in "[a-z0-9-]{1,20}",
        chain in "(generate|summary|image_analysis>summary)",
        error in proptest::option::of("[ -~]{1,40}"),
        latency in 0.0f64..1e7,
        peak in any::<u64>(),
        tokens in (any::<u32>(), any::<u32>()),
        tps in 0.0f64..1e5,
        hit in proptest::option::of(0.0f64..=1.0),
        score in proptest::option::of(0.0f64..=100.0),
        badge in proptest::option::of(badge()),
        fallback in proptest::option::of("[a-z]{1,8}"),
    ) -> Record {
        let ts = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let mut r = RecordV2::new(RecordV1 {
            schema_version: 2,
            ts: Timestamp::from_datetime(ts),
            run_id,
            chain,
            model_id: "model".into(),
            status: if error.is_some() { RunStatus::Error } else { RunStatus::Ok },
            error,
            latency_ms: latency,
            peak_memory_bytes: peak,
            cutline_bytes: peak / 2,
            tokens_in: u64::from(tokens.0),
            tokens_out: u64::from(tokens.1),
            tokens_per_s: tps,
        });
        r.lazy_cache_hit_rate = hit;
        r.health_score = score;
        r.status_badge = badge;
        r.selection = fallback.map(|f| Selection {
            model_id: "model".into(),
            reason: "memory pressure".into(),
            fallback_from: Some(f),
            trinity_score: None,
        });
        Record::from(r)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn write_then_read_is_identity(records in proptest::collection::vec(record(), 1..8)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let writer = JsonlWriter::open(&path, Durability::OsBuffered).unwrap();
        for r in &records {
            writer.append(r).unwrap();
        }
        let back: Vec<Record> = LogReader::open(&path, ReadMode::Strict)
            .unwrap()
            .read_all()
            .unwrap()
            .into_iter()
            .map(|e| e.record)
            .collect();
        prop_assert_eq!(back, records);
    }
}
