//! The runtime end to end on the real SmolLM2 model: generation, SSOT records, the
//! model cache, and refusal under a tiny cutline.

#![allow(clippy::unwrap_used)]

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use common::smollm2 as model;

use afo_runtime::engine::{FinishReason, GenerateOptions, SamplingParams};
use afo_runtime::guard::ByteSize;
use afo_runtime::ssot::{LogReader, ReadMode, Record, RunStatus, StatusBadge};
use afo_runtime::{GenerateRequest, Prompt, Runtime};

use common::capital_request as request;

#[test]
fn generates_streams_and_records_each_run() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/runs.jsonl");
    let runtime = Runtime::builder()
        .cutline("8GiB".parse::<ByteSize>().unwrap())
        .ssot_log(&log)
        .build()
        .unwrap();

    let mut streamed = String::new();
    let first = runtime
        .generate_stream(&request(24), |d| {
            streamed.push_str(d);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(streamed, first.text);
    assert!(first.text.contains("Paris"), "{:?}", first.text);
    assert!(!first.cache_hit);
    assert!(first.completion_tokens > 0 && first.completion_tokens <= 24);
    assert_eq!(first.badge, StatusBadge::Safe);
    assert!(
        first.peak_memory_bytes > 50 << 20,
        "peak {}",
        first.peak_memory_bytes
    );
    assert!(first.predicted_peak_bytes > 0);
    assert!((0.0..=100.0).contains(&first.health_score));

    let second = runtime.generate(&request(8)).unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.finish, FinishReason::Length);
    assert_eq!(second.completion_tokens, 8);
    // Re-acquiring a loaded model is far cheaper than loading it.
    assert!(
        second.acquire_ms * 10.0 < first.acquire_ms,
        "{} vs {}",
        second.acquire_ms,
        first.acquire_ms
    );

    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(entries.len(), 2);
    let Record::V2(r1) = &entries[0].record else {
        panic!("v2 expected")
    };
    assert_eq!(r1.base.run_id, first.run_id);
    assert_eq!(r1.base.status, RunStatus::Ok);
    assert_eq!(r1.base.tokens_out, first.completion_tokens as u64);
    assert_eq!(r1.base.peak_memory_bytes, first.peak_memory_bytes);
    assert!(r1.load_ms.is_some() && r1.reload_overhead_ms.is_none());
    assert_eq!(r1.status_badge, Some(StatusBadge::Safe));
    assert_eq!(r1.token_budget, Some(24));
    assert!(r1.ttft_ms.unwrap() > 0.0 && r1.kv_cache_size.unwrap() > 0);
    let Record::V2(r2) = &entries[1].record else {
        panic!("v2 expected")
    };
    assert!(r2.reload_overhead_ms.is_some());
    assert_eq!(r2.lazy_cache_hit_rate, Some(0.5));

    let health = runtime.health().unwrap();
    assert_eq!(health.loaded_models.len(), 1);
    assert_eq!(health.cutline_bytes, 8 << 30);
}

#[test]
fn a_run_that_would_pass_the_cutline_is_refused_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    // Not enough for the weights and a run on top of the process: the load or the run
    // is refused by the ledger (which one depends on what the process holds then).
    let runtime = Runtime::builder()
        .cutline(ByteSize::mib(120))
        .ssot_log(&log)
        .build()
        .unwrap();
    let err = runtime.generate(&request(4000)).unwrap_err();
    assert!(err.is_refusal(), "{err}");
    assert!(err.to_string().contains("cutline"), "{err}");
    assert_eq!(err.admission_record().unwrap().decision, "refused");
    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(entries.len(), 1);
    let v1 = entries[0].record.v1();
    assert_eq!(v1.status, RunStatus::Error);
    assert!(v1.error.as_deref().unwrap().contains("cutline"), "{v1:?}");
    let Record::V2(rec) = &entries[0].record else {
        panic!("v2 expected")
    };
    assert_eq!(rec.admission.as_ref().unwrap().decision, "refused");
    assert_eq!(runtime.memory().runs, 0);
}

#[test]
fn a_replica_and_node_id_are_written_in_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let runtime = Runtime::builder()
        .cutline(ByteSize::mib(120))
        .ssot_log(&log)
        .replica_id("replica-3")
        .node_id("node-b")
        .build()
        .unwrap();
    assert_eq!(runtime.replica_id(), Some("replica-3"));
    assert_eq!(runtime.node_id(), Some("node-b"));
    // A refused run and a failed one: both are recorded, both carry the ids.
    assert!(runtime.generate(&request(4000)).unwrap_err().is_refusal());
    let mut missing = request(4);
    missing.model = PathBuf::from("/nonexistent/model.gguf");
    runtime.generate(&missing).unwrap_err();
    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    assert!(!entries.is_empty());
    for entry in &entries {
        let Record::V2(rec) = &entry.record else {
            panic!("v2 expected")
        };
        assert_eq!(rec.replica_id.as_deref(), Some("replica-3"));
        assert_eq!(rec.node_id.as_deref(), Some("node-b"));
    }
    // Without ids, the fields are left out of the line.
    let plain_log = dir.path().join("plain.jsonl");
    let plain = Runtime::builder()
        .cutline(ByteSize::mib(120))
        .ssot_log(&plain_log)
        .build()
        .unwrap();
    plain.generate(&request(4000)).unwrap_err();
    let text = std::fs::read_to_string(&plain_log).unwrap();
    assert!(!text.is_empty());
    assert!(
        !text.contains("replica_id") && !text.contains("node_id"),
        "{text}"
    );
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let runtime = Runtime::builder().build().unwrap();
    let mut req = request(4);
    req.model = PathBuf::from("/nonexistent/model.gguf");
    let err = runtime.generate(&req).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn a_kv_budget_prunes_and_is_recorded() {
    use afo_runtime::kvcache::PrunePolicy;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs.jsonl");
    let runtime = Runtime::builder()
        .kv_budget(
            64,
            PrunePolicy::Sinks {
                sink_tokens: 4,
                window: 60,
            },
        )
        .ssot_log(&log)
        .build()
        .unwrap();
    let mut req = request(80);
    req.options.ignore_eos = true;
    let r = runtime.generate(&req).unwrap();
    assert_eq!(r.completion_tokens, 80);
    assert!(r.kv_evicted_tokens > 0, "{}", r.kv_evicted_tokens);
    // 30 layers x 2 x 3 kv heads x 64 x 4 bytes per token, at most 64 tokens.
    assert!(
        r.kv_cache_bytes <= 64 * 30 * 2 * 3 * 64 * 4,
        "{}",
        r.kv_cache_bytes
    );
    let entries = LogReader::open(&log, ReadMode::Strict)
        .unwrap()
        .read_all()
        .unwrap();
    let Record::V2(rec) = &entries[0].record else {
        panic!("v2 expected")
    };
    assert_eq!(rec.kv_evicted_tokens, Some(r.kv_evicted_tokens));
    assert_eq!(rec.kv_cache_size, Some(r.kv_cache_bytes));
}

#[test]
fn tools_and_a_schema_through_the_runtime_without_the_server() {
    use afo_runtime::engine::{Constraint, Message, ToolChoice, ToolDefinition};
    let runtime = Runtime::builder()
        .cutline("8GiB".parse::<ByteSize>().unwrap())
        .build()
        .unwrap();
    let weather = ToolDefinition::new(
        "get_weather",
        Some("The weather in a city".into()),
        serde_json::json!({"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"]}),
    )
    .unwrap();
    let ask = || Prompt::Chat(vec![Message::user("What is the weather in Paris?")]);
    let options = GenerateOptions {
        max_tokens: 96,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    // A forced call: the output is a call, read back as one.
    let r = runtime
        .generate(
            &GenerateRequest::new(model(), ask())
                .with_options(options.clone())
                .with_tools(
                    vec![weather.clone()],
                    ToolChoice::Function("get_weather".into()),
                ),
        )
        .unwrap();
    let output = r.output.expect("a chat has its output read");
    assert!(!output.tool_calls.is_empty(), "{:?}", r.text);
    assert!(output.tool_calls.iter().all(|c| c.name == "get_weather"));
    assert!(
        output.tool_calls[0].arguments["city"].is_string(),
        "{:?}",
        r.text
    );

    // A JSON schema on a plain chat: the text is the document.
    let schema = serde_json::json!({"type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]});
    let r = runtime
        .generate(
            &GenerateRequest::new(model(), Prompt::Chat(vec![Message::user("Is water wet?")]))
                .with_options(GenerateOptions {
                    constraint: Some(Constraint::json_schema(schema)),
                    ..options
                }),
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.text).unwrap();
    assert!(v["answer"] == "yes" || v["answer"] == "no", "{v}");
    assert_eq!(r.finish, FinishReason::Eos);
    assert!(r.output.unwrap().tool_calls.is_empty());
}

#[test]
fn a_loaded_model_lets_the_allocator_keep_its_prefill_chunk() {
    let runtime = Runtime::builder()
        .cutline("8GiB".parse::<ByteSize>().unwrap())
        .build()
        .unwrap();
    let acquired = runtime.acquire_model(&model(), None).unwrap();
    let chunk = runtime.estimate_text(
        acquired.model.model(),
        afo_runtime::engine::PREFILL_CHUNK,
        0,
        None,
    );
    // One 512-token chunk of SmolLM2's activations: about 16 MiB.
    let activations = chunk.estimate.activations;
    assert!(activations > 8 << 20, "{activations}");
    // The process-wide setting holds the largest model's workspace loaded so far.
    assert!(afo_runtime::guard::kept_workspace() >= activations);
}
