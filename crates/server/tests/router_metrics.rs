//! `/metrics` for cluster routers (the Gateway API Inference Extension's endpoint
//! picker, llm-d): requests waiting and running and KV-cache utilisation, under afo's
//! names and the vLLM names the picker reads by default, in valid Prometheus text.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::json;

use common::*;

/// Samples by `name{labels}` (labels as written), after checking that every line is
/// Prometheus text: `# HELP name text`, `# TYPE name kind`, or `name{labels} value`
/// with a valid name, well-formed labels, a number, and a TYPE line for its family
/// before it.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let valid_name = |n: &str| {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(valid_name(name) && !help.is_empty(), "bad HELP: {line}");
            helped.insert(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(valid_name(name), "bad TYPE: {line}");
            assert!(
                ["gauge", "counter", "histogram", "summary", "untyped"].contains(&kind),
                "bad TYPE: {line}"
            );
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line: {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                check_labels(labels, line);
                name
            }
            None => series,
        };
        assert!(valid_name(name), "bad name: {line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "no TYPE before: {line}");
        assert!(helped.contains(family), "no HELP before: {line}");
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "series twice: {line}"
        );
    }
    samples
}

/// `k="v",k2="v2"` with `\\`, `\"` and `\n` the only escapes.
fn check_labels(labels: &str, line: &str) {
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels: {line}"));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name: {line}"
        );
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    let (_, c) = chars.next().unwrap_or_else(|| panic!("{line}"));
                    assert!(matches!(c, '\\' | '"' | 'n'), "bad escape: {line}");
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value: {line}"),
            }
        };
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

async fn scrape(router: &axum::Router) -> BTreeMap<String, f64> {
    let (status, headers, text) = send(
        router,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    for kind in [
        "afo_requests_waiting",
        "afo_requests_running",
        "afo_kv_cache_usage_ratio",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ] {
        assert!(
            text.contains(&format!("# TYPE {kind} gauge\n")),
            "no gauge {kind} in\n{text}"
        );
    }
    parse(&text)
}

fn model(name: &str) -> String {
    format!("{name}{{model_name=\"{MODEL_ID}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_reports_nothing_waiting_or_running_and_no_kv() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    server.preload().unwrap();
    let m = scrape(&server.router()).await;
    for name in [
        "afo_requests_waiting",
        "afo_requests_running",
        "afo_kv_cache_usage_ratio",
    ] {
        assert_eq!(m[name], 0.0, "{name}");
    }
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ] {
        assert_eq!(m.get(&model(name)), Some(&0.0), "{name}: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_request_shows_as_running_and_holding_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    server.preload().unwrap();
    let router = server.router();
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": 64,
        "temperature": 0,
    });
    let request = {
        let router = router.clone();
        tokio::spawn(async move { send(&router, post("/v1/chat/completions", &body)).await })
    };
    // Scrape until one scrape shows the request running with its KV cache reserved.
    let until = Instant::now() + Duration::from_secs(60);
    let mut seen = None;
    while Instant::now() < until && seen.is_none() && !request.is_finished() {
        let m = scrape(&router).await;
        if m["afo_requests_running"] >= 1.0 && m["afo_kv_cache_usage_ratio"] > 0.0 {
            seen = Some(m);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (status, _, _) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let m = seen.expect("no scrape showed the request running with KV reserved");
    // The vLLM names carry the same values as afo's.
    assert_eq!(
        m[&model("vllm:num_requests_running")],
        m["afo_requests_running"]
    );
    assert_eq!(
        m[&model("vllm:num_requests_waiting")],
        m["afo_requests_waiting"]
    );
    let kv = m["afo_kv_cache_usage_ratio"];
    assert!(kv > 0.0 && kv <= 1.0, "{kv}");
    assert_eq!(m[&model("vllm:kv_cache_usage_perc")], kv);
    assert_eq!(m[&model("vllm:gpu_cache_usage_perc")], kv);

    // Once it is done, nothing runs and its KV cache is given back.
    let after = scrape(&router).await;
    assert_eq!(after["afo_requests_running"], 0.0);
    assert_eq!(after[&model("vllm:num_requests_running")], 0.0);
    assert_eq!(after["afo_kv_cache_usage_ratio"], 0.0);
}
