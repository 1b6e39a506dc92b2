//! Anthropic's Messages API (`POST /v1/messages`) over the real SmolLM2 model and the
//! tiny seeded VLM: the same runs as the chat route, in Anthropic's shapes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Cursor;

use afo_runtime::engine::TinyVlm;
use afo_server::Server;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};

const KEY: &str = "s3cret";

/// A POST to `/v1/messages` with `x-api-key` (when given) and `anthropic-version`.
fn messages(body: &Value, key: Option<&str>) -> Request<Body> {
    let mut r = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01");
    if let Some(key) = key {
        r = r.header("x-api-key", key);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

fn greedy(content: Value, max_tokens: u64) -> Value {
    json!({
        "model": MODEL_ID,
        "max_tokens": max_tokens,
        "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    })
}

/// The named events of an SSE body: `(event, data)`, checking that each data's
/// `type` is its event's name.
fn named_events(body: &str) -> Vec<(String, Value)> {
    assert!(body.ends_with("\n\n"), "{body:?}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e
                .strip_prefix("event: ")
                .and_then(|e| e.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not a named event: {e:?}"));
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], name, "{e}");
            (name.to_owned(), data)
        })
        .collect()
}

/// Checks an Anthropic error body and returns its `error` object.
fn anthropic_error(body: &Value) -> &serde_json::Map<String, Value> {
    assert_eq!(body["type"], "error", "{body}");
    let e = body["error"].as_object().unwrap();
    assert!(e["type"].is_string() && e["message"].is_string(), "{body}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_round_trip_streamed_and_not_on_the_chat_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").api_key(KEY).build().unwrap();
    let router = server.router();
    let content = json!("What is the capital of France?");

    let (status, _, v) =
        send_json(&router, messages(&greedy(content.clone(), 16), Some(KEY))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], MODEL_ID);
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(v["content"].as_array().unwrap().len(), 1);
    assert_eq!(v["content"][0]["type"], "text");
    let text = v["content"][0]["text"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    let (input, output) = (
        v["usage"]["input_tokens"].as_u64().unwrap(),
        v["usage"]["output_tokens"].as_u64().unwrap(),
    );
    assert!(input > 5 && (1..=16).contains(&output), "{v}");
    let reason = v["stop_reason"].as_str().unwrap();
    assert!(reason == "end_turn" || reason == "max_tokens", "{v}");
    assert_eq!(v["stop_sequence"], Value::Null);

    // The same greedy request on the chat route (with the bearer key): the same run.
    let chat = json!({
        "model": MODEL_ID, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}],
    });
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::from(chat.to_string()))
        .unwrap();
    let (status, _, c) = send_json(&router, request).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(c["usage"]["prompt_tokens"], input);

    // Streamed: Anthropic's event order, the same text and usage.
    let mut body = greedy(content.clone(), 16);
    body["stream"] = json!(true);
    let (status, headers, sse) = send(&router, messages(&body, Some(KEY))).await;
    assert_eq!(status, StatusCode::OK, "{sse}");
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = named_events(&sse);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..3],
        ["message_start", "ping", "content_block_start"],
        "{names:?}"
    );
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"],
        "{names:?}"
    );
    assert!(
        names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta"),
        "{names:?}"
    );
    let start = &events[0].1["message"];
    assert_eq!(start["usage"]["input_tokens"], input);
    assert_eq!(start["content"], json!([]));
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(streamed, text);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], reason);
    assert_eq!(delta["usage"]["output_tokens"], output);

    // Length and stop sequences.
    let (_, _, v) = send_json(&router, messages(&greedy(content.clone(), 2), Some(KEY))).await;
    assert_eq!(v["stop_reason"], "max_tokens", "{v}");
    assert_eq!(v["usage"]["output_tokens"], 2);
    let word = text
        .split_whitespace()
        .nth(1)
        .expect("the answer has two words");
    let cut = text.find(word).unwrap();
    let mut body = greedy(content, 16);
    body["stop_sequences"] = json!([word]);
    let (_, _, v) = send_json(&router, messages(&body, Some(KEY))).await;
    assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
    assert_eq!(v["stop_sequence"], word);
    assert_eq!(v["content"][0]["text"], &text[..cut]);

    // Every run left its record.
    assert_eq!(records(dir.path()).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_bad_requests_answer_in_anthropic_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").api_key(KEY).build().unwrap();
    let router = server.router();
    let ok = greedy(json!("hi"), 2);

    for key in [None, Some("wrong")] {
        let (status, _, v) = send_json(&router, messages(&ok, key)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(anthropic_error(&v)["type"], "authentication_error");
    }
    let bearer = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::from(ok.to_string()))
        .unwrap();
    let (status, _, v) = send_json(&router, bearer).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    let without_max = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]});
    let url_image = greedy(
        json!([{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]),
        2,
    );
    let png = greedy(
        json!([{"type": "text", "text": "what is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                "data": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="}}]),
        2,
    );
    let mut unknown = ok.clone();
    unknown["model"] = json!("no-such-model");
    let cases: [(Value, StatusCode, &str, &str); 5] = [
        (
            without_max,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            url_image,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages[0].content[0].source",
        ),
        (
            png,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "does not accept images",
        ),
        (
            unknown,
            StatusCode::NOT_FOUND,
            "not_found_error",
            "no-such-model",
        ),
        (
            json!({"model": MODEL_ID, "max_tokens": 2, "messages": [{"role": "user", "content": 7}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages[0].content",
        ),
    ];
    for (body, status, kind, names) in cases {
        let (got, _, v) = send_json(&router, messages(&body, Some(KEY))).await;
        assert_eq!(got, status, "{body} -> {v}");
        let e = anthropic_error(&v);
        assert_eq!(e["type"], kind, "{v}");
        assert!(e["message"].as_str().unwrap().contains(names), "{v}");
    }
    let not_json = Request::post("/v1/messages")
        .header("x-api-key", KEY)
        .body(Body::from("{"))
        .unwrap();
    let (status, _, v) = send_json(&router, not_json).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        anthropic_error(&v)["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
}

/// A `w x h` PNG with a colour gradient, base64.
fn png_base64(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(&bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_blocks_reach_the_vision_model() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let server = Server::builder(runtime(&dir.path().join("runs.jsonl"), "20GiB"))
        .model_as("tiny-vlm", vlm, None)
        .build()
        .unwrap();
    server.preload().unwrap();
    let router = server.router();
    let data = png_base64(64, 48);
    let body = |content: Value| {
        json!({"model": "tiny-vlm", "max_tokens": 4, "temperature": 0,
               "messages": [{"role": "user", "content": content}]})
    };
    let (status, _, text_only) = send_json(
        &router,
        messages(&body(json!([{"type": "text", "text": "Describe."}])), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text_only}");
    let with_image = json!([
        {"type": "text", "text": "Describe."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
    ]);
    let (status, _, v) = send_json(&router, messages(&body(with_image), None)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"][0]["type"], "text");
    let (with, without) = (
        v["usage"]["input_tokens"].as_u64().unwrap(),
        text_only["usage"]["input_tokens"].as_u64().unwrap(),
    );
    assert!(with > without, "the image's tokens: {with} vs {without}");

    // The chat route with the same image as a data URL: the same prompt and text.
    let chat = json!({"model": "tiny-vlm", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe."},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}]}]});
    let (status, _, c) = send_json(&router, post("/v1/chat/completions", &chat)).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["usage"]["prompt_tokens"], with);
    assert_eq!(
        c["choices"][0]["message"]["content"],
        v["content"][0]["text"]
    );

    // A broken image is named by its block.
    let broken = json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGVsbG8gd29ybGQ="}}]);
    let (status, _, v) = send_json(&router, messages(&body(broken), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let message = anthropic_error(&v)["message"].as_str().unwrap();
    assert!(message.contains("messages[0].content[0]"), "{message}");
}
