//! A vision-language model served through the router: the tiny seeded Qwen3-VL
//! checkpoint, chat completions with `image_url` parts (PNG data URLs made here).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Cursor;
use std::path::Path;

use afo_runtime::engine::TinyVlm;
use afo_server::Server;
use axum::http::StatusCode;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use tower::ServiceExt as _;

const VLM_ID: &str = "tiny-vlm";

/// A `w x h` PNG with a colour gradient, as a base64 data URL.
fn png_url(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    )
}

/// A router over the tiny VLM (written into `dir/vlm`), logging to `dir/runs.jsonl`.
fn vlm_router(dir: &Path) -> axum::Router {
    let vlm = dir.join("vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let server = Server::builder(runtime(&dir.join("runs.jsonl"), "20GiB"))
        .model_as(VLM_ID, vlm, None)
        .build()
        .unwrap();
    server.preload().unwrap();
    server.router()
}

fn body(content: Value, stream: bool) -> Value {
    json!({
        "model": VLM_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 6,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

async fn prompt_tokens(router: &axum::Router, content: Value) -> u64 {
    let (status, _, v) =
        send_json(router, post("/v1/chat/completions", &body(content, false))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    let usage = &v["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(c <= 6, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlm_chat_counts_image_tokens_streams_and_logs_image_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let router = vlm_router(dir.path());

    // Listed, and taking images.
    let (status, _, v) = send_json(
        &router,
        axum::http::Request::get("/v1/models")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == VLM_ID),
        "{v}"
    );

    let url = png_url(64, 64);
    let text_only = prompt_tokens(&router, json!("Describe the picture.")).await;
    let one = prompt_tokens(
        &router,
        json!([image_part(&url), text_part("Describe the picture.")]),
    )
    .await;
    let two = prompt_tokens(
        &router,
        json!([
            image_part(&url),
            text_part("Describe the picture."),
            image_part(&url)
        ]),
    )
    .await;
    // Each image adds its image tokens plus the vision start and end markers.
    let per_image = one - text_only;
    assert!(per_image > 2, "one image added {per_image} prompt tokens");
    assert_eq!(two - one, per_image, "{text_only} {one} {two}");

    // Streaming: the role first, the same usage, `[DONE]` last.
    let (status, headers, sse) = send(
        &router,
        post(
            "/v1/chat/completions",
            &body(
                json!([image_part(&url), text_part("Describe the picture.")]),
                true,
            ),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{sse}");
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = sse_events(&sse);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finish == "stop" || finish == "length", "{finish}");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), one, "{usage}");

    // One record per request; image pixels on those with images.
    let records = records(dir.path());
    assert_eq!(records.len(), 4, "{records:?}");
    assert!(records.iter().all(|r| r["status"] == "ok"), "{records:?}");
    let pixels: Vec<u64> = records
        .iter()
        .map(|r| r["image_pixels"].as_u64().unwrap())
        .collect();
    assert_eq!(pixels[0], 0, "{:?}", records[0]);
    assert!(pixels[1] > 0, "{:?}", records[1]);
    assert_eq!(pixels[2], 2 * pixels[1]);
    assert_eq!(pixels[3], pixels[1]);
    assert_eq!(records[1]["original_pixels"].as_u64().unwrap(), 64 * 64);
    assert_eq!(records[1]["tokens_in"].as_u64().unwrap(), one);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_image_is_a_400_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let router = vlm_router(dir.path());
    let good = png_url(32, 32);
    // A PNG signature followed by garbage: it passes the type sniffing, then fails
    // to decode.
    let mut bad = b"\x89PNG\r\n\x1a\n".to_vec();
    bad.extend_from_slice(&[7u8; 64]);
    let bad = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bad)
    );
    let (status, _, v) = send_json(
        &router,
        post(
            "/v1/chat/completions",
            &body(
                json!([image_part(&good), text_part("Compare."), image_part(&bad)]),
                false,
            ),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let e = error_of(&v);
    assert_eq!(e["code"], "invalid_image", "{v}");
    assert_eq!(e["param"], "messages[0].content[2].image_url.url", "{v}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("image 2") && message.contains("messages[0].content[2]"),
        "{message}"
    );
    // Refused before it ran: one record, saying why.
    let records = records(dir.path());
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("400 (invalid_image)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_model_still_refuses_images() {
    let dir = tempfile::tempdir().unwrap();
    let router = builder(dir.path(), "20GiB").build().unwrap().router();
    let content = json!([image_part(&png_url(16, 16)), text_part("What is this?")]);
    let mut request = body(content, false);
    request["model"] = json!(MODEL_ID);
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let e = error_of(&v);
    assert_eq!(e["code"], "model_not_vision", "{v}");
    assert!(e["message"].as_str().unwrap().contains(MODEL_ID), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vlm_answers_plain_completions_on_its_language_model() {
    let dir = tempfile::tempdir().unwrap();
    let router = vlm_router(dir.path());
    let request = json!({"model": VLM_ID, "prompt": "Once upon a time", "max_tokens": 5,
                         "temperature": 0});
    let (status, _, v) = send_json(&router, post("/v1/completions", &request)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    // The byte-level tokenizer: one token per byte of the prompt.
    assert_eq!(v["usage"]["prompt_tokens"], "Once upon a time".len(), "{v}");
    let records = records(dir.path());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["image_pixels"], 0, "{:?}", records[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vlm_queue_is_bounded_and_a_dropped_image_stream_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let server = Server::builder(runtime(&dir.path().join("runs.jsonl"), "20GiB"))
        .model_as(VLM_ID, vlm, None)
        .max_queue(1)
        .build()
        .unwrap();
    server.preload().unwrap();
    let router = server.router();
    let url = png_url(64, 64);
    let mut long = body(
        json!([image_part(&url), text_part("Tell a long story.")]),
        true,
    );
    long["max_tokens"] = json!(3000);
    // The stream holds the one queue place while its body is unread.
    let held = router
        .clone()
        .oneshot(post("/v1/chat/completions", &long))
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let (status, headers, v) = send_json(
        &router,
        post(
            "/v1/chat/completions",
            &body(json!([image_part(&url), text_part("Hi")]), false),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(error_of(&v)["code"], "queue_full");
    // Dropping the stream (the client went away) cancels the run.
    drop(held);
    let start = std::time::Instant::now();
    loop {
        // The refusal's record first (429, queue_full), then the cancelled run's.
        if let Some(r) = records(dir.path()).get(1) {
            assert_eq!(r["status"], "error", "{r}");
            assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
            assert!(r["tokens_out"].as_u64().unwrap() < 3000, "{r}");
            assert!(r["image_pixels"].as_u64().unwrap() > 0, "{r}");
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the dropped stream was never cancelled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.shutdown();
}
