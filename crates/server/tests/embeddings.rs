//! `POST /v1/embeddings` over the real SmolLM2 model: input shapes, float and base64
//! agreeing, `dimensions`, `pooling`, limits naming their field, the API key, one SSOT
//! record per request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::http::StatusCode;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn from_base64(v: &Value) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_answer_every_input_shape_and_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let texts = ["The cat sat on the mat.", "Revenue rose by three percent."];
    let (status, _, v) = send_json(
        &router,
        post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": texts}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MODEL_ID);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let floats: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            vector(&d["embedding"])
        })
        .collect();
    for f in &floats {
        assert_eq!(f.len(), 576);
        let norm: f32 = f.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 6);
    assert_eq!(v["usage"]["total_tokens"], tokens);

    // base64: the same vectors, bit for bit.
    let (status, _, b) = send_json(
        &router,
        post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": texts, "encoding_format": "base64"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    for (i, f) in floats.iter().enumerate() {
        assert_eq!(&from_base64(&b["data"][i]["embedding"]), f);
    }

    // Token ids, one list and a list of lists; dimensions; mean pooling.
    let ids = [504, 3575, 282, 4649, 314];
    let (status, _, one) = send_json(
        &router,
        post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": ids, "dimensions": 32, "pooling": "mean"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let short = vector(&one["data"][0]["embedding"]);
    assert_eq!(short.len(), 32);
    assert_eq!(one["usage"]["prompt_tokens"], 5);
    let (status, _, two) = send_json(
        &router,
        post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": [ids, [504, 3575]], "dimensions": 32, "pooling": "mean"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{two}");
    assert_eq!(vector(&two["data"][0]["embedding"]), short);
    assert_eq!(two["usage"]["prompt_tokens"], 7);
    let (_, _, last) = send_json(
        &router,
        post(
            "/v1/embeddings",
            &json!({"model": MODEL_ID, "input": ids, "dimensions": 32}),
        ),
    )
    .await;
    assert_ne!(vector(&last["data"][0]["embedding"]), short);

    let records = records(dir.path());
    assert_eq!(records.len(), 5);
    assert!(
        records
            .iter()
            .all(|r| r["chain"] == "embeddings" && r["status"] == "ok")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_name_their_field_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let cases = [
        (json!({"model": MODEL_ID, "input": []}), "input"),
        (json!({"model": MODEL_ID, "input": [1, 49_152]}), "input"),
        (json!({"model": MODEL_ID, "input": vec![7; 8193]}), "input"),
        (
            json!({"model": MODEL_ID, "input": vec![vec![7; 8000]; 9]}),
            "input",
        ),
        (
            json!({"model": MODEL_ID, "input": "x", "dimensions": 577}),
            "dimensions",
        ),
        (
            json!({"model": MODEL_ID, "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (
            json!({"model": MODEL_ID, "input": "x", "pooling": "cls"}),
            "pooling",
        ),
        (json!({"model": "nope", "input": "x"}), "model"),
    ];
    for (body, param) in &cases {
        let (status, _, v) = send_json(&router, post("/v1/embeddings", body)).await;
        let e = error_of(&v);
        let want = if *param == "model" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(status, want, "{v}");
        assert_eq!(e["param"], *param, "{v}");
    }
    let (_, _, v) = send_json(&router, post("/v1/embeddings", &cases[3].0)).await;
    assert_eq!(error_of(&v)["code"], "too_many_tokens");
    let records = records(dir.path());
    assert_eq!(records.len(), cases.len() + 1);
    assert!(
        records
            .iter()
            .all(|r| r["chain"] == "embeddings" && r["status"] == "error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_need_the_key_when_the_server_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB")
        .api_key("s3cret")
        .build()
        .unwrap();
    let router = server.router();
    let body = json!({"model": MODEL_ID, "input": "hello"});
    let (status, _, v) = send_json(&router, post("/v1/embeddings", &body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&v)["code"], "invalid_api_key");
    let mut request = post("/v1/embeddings", &body);
    request
        .headers_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let (status, _, v) = send_json(&router, request).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 576);
}
