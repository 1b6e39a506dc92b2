//! Memory admission against a small cutline. In its own test binary: the cutline is
//! compared with the resident memory of the whole process, which other tests running
//! at the same time would change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_cutline_is_refused_up_front_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "300MB").build().unwrap();
    let router = server.router();
    let body = |max_tokens: u64| {
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
               "max_tokens": max_tokens, "temperature": 0})
    };
    // 8,000 tokens of SmolLM2 KV cache take about 185 MB in f16 (the default): with
    // the weights resident that passes a 300 MB cutline.
    let (status, headers, v) = send_json(&router, post("/v1/chat/completions", &body(8000))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(error_of(&v)["code"], "memory_unavailable");
    assert!(
        error_of(&v)["message"]
            .as_str()
            .unwrap()
            .contains("cutline")
    );
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body(4))).await;
    assert_eq!(status, StatusCode::OK, "a small request still fits: {v}");
    let (_, _, h) = send_json(
        &router,
        axum::http::Request::get("/health")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert!(
        h["memory"]["resident_bytes"].as_u64().unwrap() < 400_000_000,
        "{h}"
    );
    // Every request has a record, the refused one too.
    let records = records(dir.path());
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["admission"]["decision"], "refused");
    assert!(records[0]["error"].as_str().unwrap().contains("cutline"));
    assert_eq!(records[1]["status"], "ok");
    server.shutdown();
}
