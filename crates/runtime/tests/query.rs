//! Routing end to end on the real SmolLM2 model: a catalog with SmolLM2 in f32 and in
//! int4 (both quantized from the same file while loading) and a cutline only the int4
//! variant fits under. The smaller one runs, the peak stays under the cutline, and the
//! SSOT record says why. Its own test binary: the peak is process-wide.

#![allow(clippy::unwrap_used)]

mod common;

use common::smollm2 as model;

use afo_runtime::guard::ByteSize;
use afo_runtime::select::Catalog;
use afo_runtime::ssot::{LogReader, ReadMode, Record, StatusBadge};
use afo_runtime::{QueryRequest, Runtime};

fn catalog() -> Catalog {
    let source = model().display().to_string().replace('\\', "/");
    Catalog::from_toml_str(&format!(
        r#"
        [[models]]
        id = "smollm2-f32"
        family = "smollm2-135m"
        params = 134515008
        quant = "f32"
        trinity_score = 97.5
        context_length = 8192
        estimated_bytes = "600MB"
        source = "{source}"

        [[models]]
        id = "smollm2-int4"
        family = "smollm2-135m"
        params = 134515008
        quant = "int4"
        trinity_score = 96.0
        context_length = 8192
        estimated_bytes = "150MB"
        source = "{source}"
        variant_of = "smollm2-f32"
        "#
    ))
    .unwrap()
}

#[test]
fn the_smaller_variant_runs_when_only_it_fits() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let cutline: ByteSize = "400MB".parse().unwrap();
    let runtime = Runtime::builder()
        .cutline(cutline)
        .catalog(catalog())
        .ssot_log(&log)
        .build()
        .unwrap();

    // Asked for by name: routing is bypassed, the guard is not.
    let mut request = QueryRequest::new("What is the capital of France?");
    request.model = Some("smollm2-f32".into());
    request.max_tokens = Some(16);
    let explicit = runtime.query(&request).unwrap();
    assert_eq!(explicit.model_id(), "smollm2-int4");
    let fallback = explicit.selection.fallback.as_ref().unwrap();
    assert_eq!(fallback.fallback_from, "smollm2-f32");
    assert!(explicit.response.peak_memory_bytes < cutline.0);
    assert_ne!(explicit.response.badge, StatusBadge::OverCutline);
    assert!(!explicit.response.text.is_empty());
    assert!(explicit.response.completion_tokens <= 16);
    assert_eq!(explicit.budget.max_tokens, 16);

    // Routed: the f32 card is rejected for its size, the int4 one chosen.
    let mut request = QueryRequest::new(
        "Compare and analyze the design trade-offs of B-trees and LSM trees for write-heavy workloads.",
    );
    request.max_tokens = Some(8);
    let routed = runtime.query(&request).unwrap();
    assert_eq!(routed.model_id(), "smollm2-int4");
    assert!(routed.response.peak_memory_bytes < cutline.0);
    let f32_card = routed
        .selection
        .candidates
        .iter()
        .find(|c| c.id == "smollm2-f32")
        .unwrap();
    assert!(!f32_card.is_accepted(), "{f32_card:?}");

    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(entries.len(), 2);
    let Record::V2(first) = &entries[0].record else {
        panic!("v2 expected")
    };
    let selection = first.selection.as_ref().unwrap();
    assert_eq!(selection.model_id, "smollm2-int4");
    assert_eq!(selection.fallback_from.as_deref(), Some("smollm2-f32"));
    assert!(!selection.reason.is_empty());
    assert_eq!(selection.trinity_score, Some(96.0));
    assert_eq!(first.token_budget, Some(16));
    let predicted = first.predicted_peak_bytes.unwrap();
    assert!(predicted > 0 && predicted < cutline.0, "{predicted}");
    assert!(first.base.peak_memory_bytes < cutline.0);
    eprintln!(
        "explicit f32 -> int4: {}; routed: {}; peak {} (predicted {}), cutline {}",
        selection.reason,
        routed.selection.reason_text,
        ByteSize(first.base.peak_memory_bytes),
        ByteSize(predicted),
        cutline
    );
}

#[test]
fn a_query_without_a_catalog_is_a_clear_error() {
    let runtime = Runtime::builder().build().unwrap();
    let err = runtime.query(&QueryRequest::new("hi")).unwrap_err();
    assert!(err.to_string().contains("catalog"), "{err}");
}
