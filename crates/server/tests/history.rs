//! `GET /api/history`: the ring of health samples behind the dashboard's charts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};

use common::*;

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn unix_ms() -> u64 {
    let now = std::time::SystemTime::now();
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

fn samples(v: &Value) -> &Vec<Value> {
    v["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no samples in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_one_sample_per_interval_up_to_its_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "1GiB")
        .history_samples(4)
        .history_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let router = server.router();
    // Each /health call samples when one is due: twelve calls 30 ms apart would
    // make twelve samples, of which the ring keeps the newest four.
    let started = unix_ms();
    for _ in 0..12 {
        assert_eq!(send(&router, get("/health")).await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (status, headers, v) = send_json(&router, get("/api/history")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(v["capacity"], 4);
    assert_eq!(v["interval_ms"], 20);
    assert_eq!(v["models"], json!([MODEL_ID]));
    let s = samples(&v);
    assert_eq!(s.len(), 4, "the ring is not bounded by its capacity: {v}");
    let cutline = 1u64 << 30;
    let mut last = started;
    for sample in s {
        let t = sample["t_ms"].as_u64().unwrap();
        assert!(
            t > last,
            "samples not in time order, or older than the test: {v}"
        );
        last = t;
        assert!(sample["resident_bytes"].as_u64().unwrap() > 0, "{sample}");
        assert!(sample["reserved_bytes"].is_u64(), "{sample}");
        assert_eq!(sample["cutline_bytes"].as_u64(), Some(cutline), "{sample}");
        let warn = sample["warn_bytes"].as_u64().unwrap();
        assert!(warn > 0 && warn < cutline, "{sample}");
        assert!(
            ["SAFE", "WARN", "OVER_CUTLINE"].contains(&sample["badge"].as_str().unwrap()),
            "{sample}"
        );
        // One entry per served model, nothing running on an idle server.
        assert_eq!(sample["waiting"], json!([0]), "{sample}");
        assert_eq!(sample["running"], json!([0]), "{sample}");
    }
    // The first 8 samples were dropped: the oldest kept is from late in the loop.
    let first = s[0]["t_ms"].as_u64().unwrap();
    assert!(
        first >= started + 150,
        "the oldest sample kept is from the start of the loop: {v}"
    );

    // `since` returns only the newer samples.
    let since = s[1]["t_ms"].as_u64().unwrap();
    let (status, _, newer) = send_json(&router, get(&format!("/api/history?since={since}"))).await;
    assert_eq!(status, StatusCode::OK);
    let newer = samples(&newer);
    assert!(!newer.is_empty());
    assert!(
        newer.iter().all(|x| x["t_ms"].as_u64().unwrap() > since),
        "`since` returned older samples: {newer:?}"
    );
    assert_eq!(newer[0], s[2]);
    let (status, _, bad) = send_json(&router, get("/api/history?since=yesterday")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(error_of(&bad)["param"], "since");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_needs_the_key_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "1GiB")
        .api_key("s3cret")
        .build()
        .unwrap();
    let router = server.router();
    let (status, _, v) = send_json(&router, get("/api/history")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(error_of(&v)["code"], "invalid_api_key");
    let wrong = Request::get("/api/history")
        .header("authorization", "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&router, wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::get("/api/history")
        .header("authorization", "bearer s3cret")
        .body(Body::empty())
        .unwrap();
    let (status, _, v) = send_json(&router, right).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(samples(&v).len(), 1, "{v}");
    assert_eq!(v["models"], json!([MODEL_ID]));
    // Letting a scraper read /metrics does not open the history.
    let server = builder(dir.path(), "1GiB")
        .api_key("s3cret")
        .public_metrics(true)
        .build()
        .unwrap();
    let router = server.router();
    assert_eq!(send(&router, get("/metrics")).await.0, StatusCode::OK);
    assert_eq!(
        send(&router, get("/api/history")).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_charts_the_history_with_nothing_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "1GiB").build().unwrap();
    let (status, _, page) = send(&server.router(), get("/")).await;
    assert_eq!(status, StatusCode::OK);
    for chart in [
        "chart-memory",
        "badge-strip",
        "chart-tps",
        "chart-ttft",
        "chart-queue",
    ] {
        assert!(
            page.contains(&format!("<svg id=\"{chart}\"")),
            "no {chart} chart"
        );
    }
    assert!(
        page.contains("\"/api/history\""),
        "the page does not read the history"
    );
    // Self-contained: no script, style, font or image from another origin.
    for outside in ["://", "<link", "src=", "@import", "url("] {
        assert!(
            !page.contains(outside),
            "the page loads something: `{outside}`"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_server_samples_without_being_asked() {
    let dir = tempfile::tempdir().unwrap();
    let build = || {
        builder(dir.path(), "1GiB")
            .history_interval(Duration::from_millis(50))
            .build()
            .unwrap()
    };
    // Mounted only, nothing samples until a call.
    let mounted = build();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, _, v) = send_json(&mounted.router(), get("/api/history")).await;
    assert_eq!(samples(&v).len(), 1, "{v}");

    // Serving, the sampler takes one every 50 ms with nobody calling.
    let server = build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("serve did not return after the shutdown signal")
        .unwrap()
        .unwrap();
    let (_, _, v) = send_json(&server.router(), get("/api/history")).await;
    // About 20 in a second; 5 leaves room for a busy machine.
    assert!(samples(&v).len() >= 5, "the sampler did not run: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_a_request_running_and_the_memory_it_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .history_interval(Duration::from_millis(10))
        .build()
        .unwrap();
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
    // Poll the history until a sample shows the request running.
    let until = Instant::now() + Duration::from_secs(60);
    let mut seen = None;
    while Instant::now() < until && seen.is_none() {
        let (_, _, v) = send_json(&router, get("/api/history")).await;
        seen = samples(&v)
            .iter()
            .find(|s| s["running"][0].as_u64().unwrap() >= 1)
            .cloned();
        if request.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, _, _) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let running = seen.expect("no sample showed the request running");
    // While it ran, the ledger held the model and the run's bytes.
    assert!(running["reserved_bytes"].as_u64().unwrap() > 0, "{running}");
}
