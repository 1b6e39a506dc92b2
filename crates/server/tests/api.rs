//! The HTTP API over the real SmolLM2 model, through the router and a real socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

fn chat_body(content: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_matches_non_streaming_and_logs_each_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();

    let (status, _, v) = send_json(
        &router,
        post(
            "/v1/chat/completions",
            &chat_body("What is the capital of France?", 24, false),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_ID);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && (1..=24).contains(&c), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
    let finish = choice["finish_reason"].as_str().unwrap().to_owned();
    assert!(finish == "stop" || finish == "length");

    // The same greedy request streamed: the same text, in OpenAI's chunk order.
    let (status, headers, body) = send(
        &router,
        post(
            "/v1/chat/completions",
            &chat_body("What is the capital of France?", 24, true),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id), "one id per stream");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"].as_u64().unwrap(),
        c
    );
    assert_eq!(usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap(), p);
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], finish.as_str());
    let streamed: String = chunks[..chunks.len() - 1]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert!(
        chunks[1..chunks.len() - 2]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    let records = records(dir.path());
    assert_eq!(records.len(), 2, "one SSOT line per request");
    for r in &records {
        assert_eq!(r["schema_version"], 2);
        assert_eq!(r["status"], "ok");
        assert_eq!(r["model_id"], MODEL_ID);
        assert_eq!(r["tokens_out"].as_u64().unwrap(), c);
        assert!(r["ttft_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(r["status_badge"], "SAFE");
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_models_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();

    let (status, _, v) = send_json(
        &router,
        post("/v1/completions", &json!({"model": MODEL_ID, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with(" Paris"),
        "greedy SmolLM2 continues with Paris: {text:?}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let (status, _, v) = send_json(
        &router,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL_ID, "auto"]);

    let (status, _, h) = send_json(
        &router,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["badge"], "SAFE");
    assert!(
        h["memory"]["resident_bytes"].as_u64().unwrap() > 90_000_000,
        "{h}"
    );
    assert_eq!(h["memory"]["cutline_bytes"].as_u64().unwrap(), 20 << 30);
    assert_eq!(h["models"][0]["loaded"], true);
    assert_eq!(h["loaded_models"].as_array().unwrap().len(), 1);

    // `auto` without a catalog runs the first model; its record says so.
    let (status, _, v) = send_json(
        &router,
        post("/v1/chat/completions", &json!({"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["model"], MODEL_ID);
    let r = records(dir.path());
    assert!(
        r[1]["selection"]["reason"]
            .as_str()
            .unwrap()
            .contains("auto"),
        "{}",
        r[1]
    );

    let (status, headers, text) = send(
        &router,
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
    for name in [
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
        "gen_ai_client_token_usage_bucket",
        "afo_memory_resident_bytes",
        "afo_memory_cutline_bytes",
        "afo_model_cache_hit_ratio",
    ] {
        assert!(text.contains(name), "no {name} in /metrics:\n{text}");
    }
    let runs_line = text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "afo_runs_total{{gen_ai_request_model=\"{MODEL_ID}\",outcome=\"ok\"}}"
            ))
        })
        .unwrap();
    assert!(runs_line.ends_with(" 2"), "{runs_line}");
    let (status, _, page) = send(&router, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("data-testid=\"badge\""));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .max_body_bytes(4096)
        .build()
        .unwrap();
    let router = server.router();
    let raw = |body: &'static str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let cases: Vec<(Request<Body>, StatusCode, Option<&str>)> = vec![
        (raw("{not json"), StatusCode::BAD_REQUEST, None),
        (
            raw(r#"{"model": 5, "messages": []}"#),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (raw(r#"{"model": "m"}"#), StatusCode::BAD_REQUEST, None),
        (
            post(
                "/v1/chat/completions",
                &json!({"model": MODEL_ID, "messages": []}),
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            ),
            StatusCode::NOT_FOUND,
            Some("model_not_found"),
        ),
        (
            post(
                "/v1/chat/completions",
                &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("request_too_large"),
        ),
        (
            post(
                "/v1/chat/completions",
                &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("invalid_image_url"),
        ),
        (
            post(
                "/v1/chat/completions",
                &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("invalid_image"),
        ),
        (
            post(
                "/v1/chat/completions",
                &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}]}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("model_not_vision"),
        ),
        (
            post(
                "/v1/completions",
                &json!({"model": MODEL_ID, "prompt": ["a", "b"]}),
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Request::get("/v1/nothing").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            Some("unknown_url"),
        ),
    ];
    for (request, want, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, _, v) = send_json(&router, request).await;
        assert_eq!(status, want, "{what}: {v}");
        let e = error_of(&v);
        if let Some(code) = code {
            assert_eq!(e["code"], code, "{what}: {v}");
        }
    }
    let (_, _, v) = send_json(
        &router,
        post(
            "/v1/chat/completions",
            &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}]}]}),
        ),
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("model `{MODEL_ID}` does not accept images"))
    );
    // Nothing reached the model, and every request to a generation endpoint left one
    // record saying why it was refused.
    let records = records(dir.path());
    assert!(records.len() >= 6, "{records:?}");
    for r in &records {
        assert_eq!(r["status"], "error", "{r}");
        assert_eq!(r["tokens_out"], 0, "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.starts_with("400") || e.starts_with("404") || e.starts_with("413"),
            "{r}"
        );
    }
    assert!(records.iter().any(|r| {
        r["error"]
            .as_str()
            .unwrap()
            .contains("does not accept images")
    }));
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .api_key("s3cret")
        .build()
        .unwrap();
    let router = server.router();
    let (status, _, v) = send_json(
        &router,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&v)["code"], "invalid_api_key");
    let wrong = Request::get("/v1/models")
        .header("authorization", "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&router, wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::get("/v1/models")
        .header("authorization", "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&router, right).await.0, StatusCode::OK);
    // Health stays open for load balancers.
    assert_eq!(
        send(
            &router,
            Request::get("/health").body(Body::empty()).unwrap()
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batch_and_equal_single_runs() {
    let dir = tempfile::tempdir().unwrap();
    // Batching alone: with the prefix cache on, the repeated prompts would reuse their
    // first pass's blocks and run their tails in a shorter chunk, whose float rounding
    // may flip a near-tie greedy token (the prefix cache has its own tests).
    let runtime = std::sync::Arc::new(
        afo_runtime::Runtime::builder()
            .cutline("20GiB".parse().unwrap())
            .ssot_log(dir.path().join("runs.jsonl"))
            .prefix_cache(afo_runtime::kvcache::PrefixCacheConfig {
                budget_bytes: 0,
                ..Default::default()
            })
            .build()
            .unwrap(),
    );
    let server = afo_server::Server::builder(runtime)
        .model(smollm2_path())
        .max_batch(4)
        .build()
        .unwrap();
    let router = server.router();
    let prompts = [
        "Name a color.",
        "What is 2+2?",
        "Say hello.",
        "Name a fruit.",
    ];
    let mut single = Vec::new();
    for p in prompts {
        let (s, _, v) = send_json(
            &router,
            post("/v1/chat/completions", &chat_body(p, 12, false)),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        single.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let router = router.clone();
            let body = chat_body(p, 12, false);
            tokio::spawn(
                async move { send_json(&router, post("/v1/chat/completions", &body)).await },
            )
        })
        .collect();
    for (task, want) in tasks.into_iter().zip(&single) {
        let (s, _, v) = task.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str().unwrap(),
            want
        );
    }
    assert_eq!(records(dir.path()).len(), 8);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_says_when_to_retry_and_a_dropped_stream_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").max_queue(1).build().unwrap();
    let router = server.router();
    // A long stream holds the one queue place while its body is unread.
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 2000, "stream": true, "temperature": 0});
    let held = router
        .clone()
        .oneshot(post("/v1/chat/completions", &body))
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let (status, headers, v) = send_json(
        &router,
        post("/v1/chat/completions", &chat_body("Hi", 4, false)),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(error_of(&v)["code"], "queue_full");
    // Dropping the stream (the client went away) cancels the run and frees the place.
    drop(held);
    let start = Instant::now();
    loop {
        let r = records(dir.path());
        // The refusal's record first (429, queue_full), then the cancelled run's.
        if let Some(refused) = r.first() {
            assert!(
                refused["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("429 (queue_full)"),
                "{refused}"
            );
        }
        if let Some(r) = r.get(1) {
            assert_eq!(r["status"], "error");
            assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
            assert!(r["tokens_out"].as_u64().unwrap() < 2000);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the dropped stream was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, v) = send_json(
        &router,
        post("/v1/chat/completions", &chat_body("Hi", 4, false)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_stream_in_flight() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    server.preload().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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
    let body = chat_body("Write a sentence about the sea.", 40, true).to_string();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Wait for the first chunk, then ask the server to stop.
    while !String::from_utf8_lossy(&got).contains("chat.completion.chunk") {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    stop_tx.send(()).unwrap();
    // New connections are refused while the stream in flight still finishes.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), socket.read(&mut buf))
            .await
            .expect("the stream stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&got).contains("data: [DONE]") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("data: [DONE]"),
        "the stream in flight was cut: {text}"
    );
    drop(socket);
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("serve did not return after the shutdown signal")
        .unwrap()
        .unwrap();
    let r = records(dir.path());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["status"], "ok");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
    // After shutdown the workers are gone: requests get 503, not a hang.
    let (status, _, v) = send_json(
        &server.router(),
        post("/v1/chat/completions", &chat_body("Hi", 2, false)),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_streams_are_not_buffered_past_the_limit() {
    // A body sent in chunks larger than the limit in total is refused with 413.
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .max_body_bytes(1024)
        .build()
        .unwrap();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 100])).collect();
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let response = server.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error_of(&v)["code"], "request_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_its_socket_cancels_a_non_streaming_request() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    server.preload().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener, std::future::pending()).await })
    };
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a very long story."}],
                      "max_tokens": 3000, "temperature": 0.8, "seed": 1})
    .to_string();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(socket);
    let start = Instant::now();
    let record = loop {
        if let Some(r) = records(dir.path()).pop() {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the abandoned request never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(record["status"], "error", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("client went away"),
        "{record}"
    );
    assert!(record["tokens_out"].as_u64().unwrap() < 3000, "{record}");
    serving.abort();
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_routes_through_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let source = smollm2_path().display().to_string().replace('\\', "/");
    let catalog = afo_runtime::select::Catalog::from_toml_str(&format!(
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
        "#
    ))
    .unwrap();
    let runtime = std::sync::Arc::new(
        afo_runtime::Runtime::builder()
            .catalog(catalog)
            .ssot_log(dir.path().join("runs.jsonl"))
            .build()
            .unwrap(),
    );
    let server = afo_server::Server::builder(runtime).build().unwrap();
    let router = server.router();
    let (status, _, v) = send_json(
        &router,
        post("/v1/chat/completions", &json!({"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["model"], "smollm2-f32",
        "the catalog card's id names the model"
    );
    let r = records(dir.path());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["selection"]["model_id"], "smollm2-f32");
    assert_eq!(r[0]["selection"]["trinity_score"], 97.5);
    assert_ne!(r[0]["selection"]["reason"], "explicit");
    // A served id that is not in the catalog is unknown here.
    let (status, _, _) = send_json(
        &router,
        post("/v1/chat/completions", &chat_body("Hi", 2, false)),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_time_limit_is_cancelled_with_504() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .request_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    server.preload().unwrap();
    let router = server.router();
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a very long story."}],
                      "max_tokens": 3000, "temperature": 0.8, "seed": 3});
    let start = Instant::now();
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert_eq!(error_of(&v)["code"], "timeout");
    assert!(start.elapsed() < Duration::from_secs(30));
    let r = records(dir.path());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["status"], "error");
    assert!(r[0]["tokens_out"].as_u64().unwrap() < 3000);
    // A stream that runs out of time ends with an error event, not [DONE].
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (status, _, text) = send(&router, post("/v1/chat/completions", &stream_body)).await;
    if status == StatusCode::OK {
        let events = sse_events(&text);
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "timeout", "{text}");
        assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    } else {
        // The time ran out before the first token (a busy machine): a plain 504.
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error_of(&v)["code"], "timeout");
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_reused_from_the_prefix_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let system = "You are a careful assistant who answers geography questions briefly. ".repeat(6);
    let ask = |q: &str| {
        json!({
            "model": MODEL_ID,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "temperature": 0,
            "max_tokens": 8,
        })
    };
    let (status, _, first) = send_json(
        &router,
        post("/v1/chat/completions", &ask("Capital of France?")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, _, second) = send_json(
        &router,
        post("/v1/chat/completions", &ask("Capital of Italy?")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let records = records(dir.path());
    assert_eq!(records.len(), 2);
    let hits: Vec<u64> = records
        .iter()
        .map(|r| r["prefix_cache_hit_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(hits[0], 0, "nothing cached before the first request");
    // The system prompt spans several 16-token blocks: the second request reuses
    // them, but never its whole prompt (the question differs).
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(hits[1] >= 64 && hits[1] < prompt, "{hits:?} of {prompt}");
    server.shutdown();
}
