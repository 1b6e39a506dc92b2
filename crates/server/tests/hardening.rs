//! Abuse the server as a hostile client would: disclosure without the key, method
//! and scheme quirks, unsupported and oversized parameters, prompts too long to
//! tokenize, connections that idle or trickle, the connection cap, cancellation and
//! time limits inside a prefill, and the queue timeout's 429 against memory's 503.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn get(uri: &str, key: Option<&str>) -> Request<Body> {
    let mut r = Request::get(uri);
    if let Some(k) = key {
        r = r.header("authorization", k);
    }
    r.body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_only_status_and_memory_are_public() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .api_key("s3cret")
        .build()
        .unwrap();
    let router = server.router();
    // /health without the key: status, badge, memory; no paths, no models, no log.
    let (status, _, public) = send_json(&router, get("/health", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        public["memory"]["cutline_bytes"].as_u64().is_some(),
        "{public}"
    );
    assert!(
        public["badge"].is_string() && public["status"] == "ok",
        "{public}"
    );
    for hidden in ["models", "ssot_log", "loaded_models"] {
        assert!(
            public.get(hidden).is_none(),
            "`{hidden}` shown without the key: {public}"
        );
    }
    assert!(!public.to_string().contains(".gguf"), "{public}");
    // With it, everything; the scheme name in any case (RFC 7235).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let key = format!("{scheme} s3cret");
        let (status, _, full) = send_json(&router, get("/health", Some(&key))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            full["models"].is_array() && full["ssot_log"].is_string(),
            "{full}"
        );
        assert_eq!(
            send(&router, get("/v1/models", Some(&key))).await.0,
            StatusCode::OK
        );
    }
    // Run metadata and metrics need the key.
    for path in ["/api/runs", "/metrics"] {
        let (status, _, v) = send_json(&router, get(path, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(error_of(&v)["code"], "invalid_api_key");
        let wrong = send(&router, get(path, Some("Bearer nope"))).await.0;
        assert_eq!(wrong, StatusCode::UNAUTHORIZED, "{path}");
        let right = send(&router, get(path, Some("Bearer s3cret"))).await.0;
        assert_eq!(right, StatusCode::OK, "{path}");
    }
    // A scraper may be let in to /metrics alone.
    let server = builder(dir.path(), "20GiB")
        .api_key("s3cret")
        .public_metrics(true)
        .build()
        .unwrap();
    let router = server.router();
    assert_eq!(send(&router, get("/metrics", None)).await.0, StatusCode::OK);
    assert_eq!(
        send(&router, get("/api/runs", None)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_gets_an_openai_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let (status, _, v) = send_json(&server.router(), get("/v1/chat/completions", None)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let e = error_of(&v);
    assert_eq!(e["code"], "method_not_allowed");
    assert!(e["message"].as_str().unwrap().contains("GET"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_and_oversized_parameters_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let base = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };
    let cases = [
        (with("logprobs", json!(3)), "logprobs"),
        (with("top_logprobs", json!(3)), "top_logprobs"),
        (with("top_logprobs", json!(21)), "top_logprobs"),
        (
            with("tools", json!([{"type": "retrieval"}])),
            "tools[0].type",
        ),
        (with("tool_choice", json!("required")), "tool_choice"),
        (
            with("response_format", json!({"type": "yaml"})),
            "response_format.type",
        ),
        (with("logit_bias", json!({"x": -100})), "logit_bias"),
        (with("logit_bias", json!({"5": 101})), "logit_bias"),
        (with("n", json!(9)), "n"),
        (with("functions", json!([{"name": "f"}])), "functions"),
        (with("echo", json!(true)), "echo"),
        (with("stop", json!(["x".repeat(3 << 20)])), "stop"),
        (with("stop", json!(["a", "b", "c", "d", "e"])), "stop"),
        (with("model", json!("m".repeat(1000))), "model"),
    ];
    let before = records(dir.path()).len();
    for (body, param) in &cases {
        let (status, _, v) = send_json(&router, post("/v1/chat/completions", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{param}: {v}");
        assert_eq!(error_of(&v)["param"], *param, "{v}");
    }
    // Fields that ask for nothing are fine.
    let quiet = [
        with("logprobs", json!(false)),
        with("tools", json!([])),
        with("response_format", json!({"type": "text"})),
        with("tool_choice", json!("none")),
    ];
    for body in &quiet {
        let (status, _, v) = send_json(&router, post("/v1/chat/completions", body)).await;
        assert_eq!(status, StatusCode::OK, "{body}: {v}");
    }
    // Every request, refused or not, has its record.
    assert_eq!(
        records(dir.path()).len(),
        before + cases.len() + quiet.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_long_for_any_tokenization_is_refused_on_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    // 4 MB of text: SmolLM2 takes 8192 tokens of at most a few dozen bytes each.
    let body = json!({"model": MODEL_ID, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "lorem ipsum ".repeat(350_000)}]});
    let (status, _, v) = send_json(&server.router(), post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let e = error_of(&v);
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("4200000 bytes"),
        "refused on bytes, not tokens: {message}"
    );
}

/// A server on a loopback socket, with `configure` applied to its builder.
async fn serve(
    dir: &std::path::Path,
    configure: impl FnOnce(afo_server::ServerBuilder) -> afo_server::ServerBuilder,
) -> (
    afo_server::Server,
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    let server = configure(builder(dir, "20GiB")).build().unwrap();
    server.preload().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    let handle = tokio::spawn(async move {
        let _ = s.serve(listener, std::future::pending()).await;
    });
    (server, addr, handle)
}

/// Reads until the server closes the connection; the bytes read, or `None` when it
/// is still open after `wait`.
async fn closed_within(socket: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().map(|()| got)
}

async fn health_status(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr, handle) = serve(dir.path(), |b| {
        b.header_timeout(Duration::from_millis(600))
            .idle_timeout(Duration::from_millis(300))
    })
    .await;
    // Says nothing: closed as idle.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5))
            .await
            .is_some(),
        "a silent connection stays open"
    );
    // Sends a head one byte at a time and never finishes it: closed by the header
    // timeout although bytes keep coming.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let trickle = async {
        for b in b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let cut_off = tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .unwrap();
    assert!(cut_off, "a trickled head was allowed to run on");
    // A kept-alive connection after its response is closed too.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut kept, Duration::from_secs(5)).await;
    let got = got.expect("an idle kept-alive connection stays open");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(health_status(addr).await.contains("200"));
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr, handle) = serve(dir.path(), |b| {
        b.max_connections(4).idle_timeout(Duration::from_secs(60))
    })
    .await;
    // Twelve silent connections against a cap of four: the oldest idle ones are
    // closed to make room, and /health still answers.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(health_status(addr).await.contains("200"));
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(200)).await.is_some() {
            closed += 1;
        }
    }
    assert!(
        closed >= 8,
        "only {closed} of 12 idle connections made room"
    );
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_connection_is_busy_a_new_one_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr, handle) = serve(dir.path(), |b| b.max_connections(1)).await;
    // One connection with a long request in flight.
    let body =
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 400, "temperature": 0.8, "seed": 3})
        .to_string();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    busy.write_all(body.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = TcpStream::connect(addr).await.unwrap();
    let got = closed_within(&mut late, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too_many_connections"), "{text}");
    drop(busy);
    handle.abort();
}

/// A prompt of about `tokens` tokens of plain English.
fn long_prompt(tokens: usize) -> String {
    "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(tokens / 14)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_during_the_prefill_stops_it_between_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // Small chunks: the prompt runs over many steps.
    let (server, addr, handle) = serve(dir.path(), |b| b.prefill_chunk(16)).await;
    let body = json!({"model": MODEL_ID, "stream": true, "max_tokens": 8,
                      "messages": [{"role": "user", "content": long_prompt(1500)}]})
    .to_string();
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body.as_bytes()).await.unwrap();
    // While the prompt runs, /health counts it as running.
    let router = server.router();
    let seen_running = loop {
        let (_, _, h) = send_json(&router, get("/health", None)).await;
        if h["models"][0]["running"] == 1 {
            break true;
        }
        if !records(dir.path()).is_empty() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        seen_running,
        "a prefilling request was never shown as running"
    );
    drop(socket);
    let start = Instant::now();
    let record = loop {
        if let Some(r) = records(dir.path()).pop() {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("client went away"),
        "{record}"
    );
    // Cancelled inside the prompt: no token was generated.
    assert_eq!(record["tokens_out"], 0, "{record}");
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_limit_applies_inside_the_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .prefill_chunk(16)
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    server.preload().unwrap();
    let body = json!({"model": MODEL_ID, "max_tokens": 8,
                      "messages": [{"role": "user", "content": long_prompt(1500)}]});
    let (status, _, v) = send_json(&server.router(), post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{v}");
    let record = records(dir.path()).pop().unwrap();
    assert_eq!(
        record["tokens_out"], 0,
        "timed out inside the prompt: {record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_behind_others_is_429_and_waiting_for_memory_is_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .max_batch(1)
        .queue_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    server.preload().unwrap();
    let router = server.router();
    let long = json!({"model": MODEL_ID, "max_tokens": 200, "temperature": 0.8, "seed": 1,
                      "messages": [{"role": "user", "content": "Tell a long story."}]});
    let short = json!({"model": MODEL_ID, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "Hi"}]});
    let first = tokio::spawn({
        let router = router.clone();
        async move { send_json(&router, post("/v1/chat/completions", &long)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, headers, v) = send_json(&router, post("/v1/chat/completions", &short)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(error_of(&v)["code"], "queue_timeout");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(first.await.unwrap().0, StatusCode::OK);

    // Memory held elsewhere: the request waits for the ledger, then 503 with the
    // numbers.
    let runtime = server.runtime();
    let available = runtime.memory().available();
    let _held = runtime.hold(
        afo_runtime::guard::MemoryKind::Workspace,
        available - (1 << 20),
    );
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &short)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let e = error_of(&v);
    assert_eq!(e["code"], "memory_unavailable");
    assert!(e["message"].as_str().unwrap().contains("needs"), "{v}");
}
