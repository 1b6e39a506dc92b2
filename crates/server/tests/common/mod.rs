//! Shared helpers of the server's integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afo_runtime::Runtime;
use afo_server::{Server, ServerBuilder};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

/// The SmolLM2 GGUF's file name.
pub(crate) const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The id the server gives it.
pub(crate) const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

/// The path of the real test model; fails the test (never skips it) when missing.
pub(crate) fn smollm2_path() -> PathBuf {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(SMOLLM2);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set AFO_MODEL_DIR)",
        path.display()
    );
    path
}

/// A runtime logging to `log`, with `cutline`.
pub(crate) fn runtime(log: &Path, cutline: &str) -> Arc<Runtime> {
    Arc::new(
        Runtime::builder()
            .cutline(cutline.parse().unwrap())
            .ssot_log(log)
            .build()
            .unwrap(),
    )
}

/// A server builder over SmolLM2 with a log in `dir`.
pub(crate) fn builder(dir: &Path, cutline: &str) -> ServerBuilder {
    Server::builder(runtime(&dir.join("runs.jsonl"), cutline)).model(smollm2_path())
}

/// The records of the SSOT log in `dir`.
pub(crate) fn records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("runs.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSON POST.
pub(crate) fn post(uri: &str, body: &serde_json::Value) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// Sends `request` and returns the status, the headers and the whole body.
pub(crate) async fn send(
    router: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// Sends `request` and parses the body as JSON.
pub(crate) async fn send_json(
    router: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let (status, headers, body) = send(router, request).await;
    let value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body}"));
    (status, headers, value)
}

/// Checks an OpenAI-style error body and returns its `error` object.
pub(crate) fn error_of(body: &serde_json::Value) -> &serde_json::Map<String, serde_json::Value> {
    let e = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object in {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(e.contains_key(key), "error body lacks `{key}`: {body}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body does not end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {e:?}"))
                .to_owned()
        })
        .collect()
}
