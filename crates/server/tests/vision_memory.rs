//! Memory admission of a vision-language request against a cutline a little above the
//! loaded tiny VLM. In its own test binary: the cutline is compared with the resident
//! memory of the whole process, which other tests running at the same time would
//! change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Cursor;

use afo_runtime::engine::TinyVlm;
use afo_server::Server;
use axum::http::StatusCode;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};

/// A `w x h` PNG of noise-like colours, as a base64 data URL.
fn png_url(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 + y * 13) as u8, (x * y) as u8, (x ^ y) as u8])
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

fn request(images: usize, side: u32, max_tokens: u64) -> Value {
    let url = png_url(side, side);
    let mut content: Vec<Value> = (0..images)
        .map(|_| json!({"type": "image_url", "image_url": {"url": url}}))
        .collect();
    content.push(json!({"type": "text", "text": "Describe the pictures."}));
    json!({"model": "tiny-vlm", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_request_past_the_cutline_is_refused_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let vlm = dir.path().join("vlm");
    TinyVlm::default().write(&vlm).unwrap();
    let probe = runtime(&dir.path().join("probe.jsonl"), "20GiB");
    let rss = probe.memory().rss;
    // The tiny model's weights are a few MB; 40 MB above the process leaves room for
    // them and a small request, not for eight 512 x 512 images and 2,000 tokens (the
    // estimator puts that at 43.6 MiB: pixels, encoder states, KV cache and the fused
    // attention's accumulators, against 27 MiB left under the cutline after the
    // ledger's margin).
    let cutline = rss + (40 << 20);
    let server = Server::builder(runtime(
        &dir.path().join("runs.jsonl"),
        &cutline.to_string(),
    ))
    .model_as("tiny-vlm", vlm, None)
    .build()
    .unwrap();
    server.preload().unwrap();
    let router = server.router();

    let (status, headers, v) = send_json(
        &router,
        post("/v1/chat/completions", &request(8, 512, 2000)),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(headers.contains_key("retry-after"));
    let e = error_of(&v);
    assert_eq!(e["code"], "memory_unavailable", "{v}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("cutline"), "{message}");

    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &request(1, 32, 4))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a small image request still fits: {v}"
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // Both requests have a record: the refusal first, with the ledger's figures.
    let records = records(dir.path());
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["status"], "error");
    assert_eq!(
        records[0]["admission"]["decision"], "refused",
        "{:?}",
        records[0]
    );
    assert!(records[1]["image_pixels"].as_u64().unwrap() > 0);
    assert!(records[1]["predicted_peak_bytes"].as_u64().unwrap() <= cutline);
    server.shutdown();
}
