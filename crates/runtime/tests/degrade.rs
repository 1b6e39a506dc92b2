//! Degrading instead of refusing, and evicting only for a load that needs the bytes.
//! In its own test binary: the cutlines here are a few MiB above the process's own
//! memory, which other tests running at the same time would change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use afo_runtime::engine::{GenerateOptions, SamplingParams};
use afo_runtime::guard::{ByteSize, MemoryKind};
use afo_runtime::ssot::{LogReader, ReadMode, Record};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

fn request(max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(
        common::smollm2(),
        Prompt::Text("The capital of France is".into()),
    )
    .with_options(GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    })
}

#[test]
fn a_run_too_large_for_the_cutline_runs_a_cheaper_plan_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let runtime = Runtime::builder()
        .cutline(ByteSize::gib(2))
        .ssot_log(&log)
        .build()
        .unwrap();
    runtime.preload(&common::smollm2()).unwrap();
    // Memory held elsewhere (as queued images would be) leaves about 24 MiB under the
    // cutline: 4,000 tokens of SmolLM2's f32 KV cache alone take 184 MB, and a KV
    // budget of 2,048 tokens 94 MB.
    let available = runtime.memory().available();
    let _held = runtime.hold(MemoryKind::Images, available - (24 << 20));
    let cutline = runtime.budget().cutline();
    let r = runtime.generate(&request(4000)).unwrap();
    assert_eq!(r.admission.decision, "degraded", "{:?}", r.admission);
    assert_eq!(
        r.admission.tried.first().map(String::as_str),
        Some("as asked")
    );
    assert!(r.admission.tried.len() >= 2, "{:?}", r.admission);
    assert_eq!(r.admission.tried.last(), Some(&r.admission.plan));
    assert!(
        r.token_budget < 4000 || r.kv_evicted_tokens > 0,
        "a cheaper plan: {r:?}"
    );
    assert_eq!(r.completion_tokens, r.token_budget);
    assert!(r.predicted_peak_bytes <= cutline);
    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(entries.len(), 1);
    let Record::V2(rec) = &entries[0].record else {
        panic!("v2 expected")
    };
    assert_eq!(rec.admission.as_ref(), Some(&r.admission));
    assert!(rec.unaccounted_bytes.is_some());
    // The run's bytes came back; the weights stay while the model is cached.
    let after = runtime.memory();
    assert_eq!(after.runs, 0);
    assert_eq!(after.reserved.get(MemoryKind::KvCache), 0);
    assert_eq!(after.reserved.get(MemoryKind::Workspace), 0);
    assert!(after.reserved.get(MemoryKind::Weights) > 0);
}
