//! Property tests: nothing a client sends makes request parsing or the router panic,
//! and every refusal is an OpenAI-style error body.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use afo_server::Server;
use afo_server::openai::{ParseLimits, PromptInput, parse_chat, parse_completion};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;
use proptest::prelude::*;
use serde_json::Value;
use tower::ServiceExt as _;

/// Arbitrary JSON values, biased toward the shapes of real requests.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("user"),
            Just("system"),
            Just("text"),
            Just("image_url"),
            Just("data:image/png;base64,iVBORw0KGgo="),
            Just("auto"),
            Just("m"),
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("model"),
                    Just("messages"),
                    Just("role"),
                    Just("content"),
                    Just("type"),
                    Just("text"),
                    Just("image_url"),
                    Just("url"),
                    Just("stream"),
                    Just("max_tokens"),
                    Just("temperature"),
                    Just("top_p"),
                    Just("stop"),
                    Just("n"),
                    Just("prompt"),
                    Just("stream_options"),
                    Just("include_usage"),
                    Just("seed"),
                ]
                .prop_map(str::to_owned),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let limits = ParseLimits::default();
        if let Err(e) = parse_chat(&bytes, &limits) {
            prop_assert_eq!(e.status.as_u16(), 400);
        }
        if let Err(e) = parse_completion(&bytes) {
            prop_assert_eq!(e.status.as_u16(), 400);
        }
    }

    #[test]
    fn parsing_arbitrary_json_never_panics(v in json_value()) {
        let body = v.to_string();
        let limits = ParseLimits { max_image_bytes: 64, max_images: 2 };
        for result in [parse_chat(body.as_bytes(), &limits), parse_completion(body.as_bytes())] {
            match result {
                Ok(r) => {
                    if let PromptInput::Chat(m) = &r.prompt {
                        prop_assert!(!m.is_empty(), "a chat request with no messages was accepted");
                    }
                    prop_assert!(r.sampling.max_tokens != Some(0));
                }
                Err(e) => {
                    prop_assert_eq!(e.status.as_u16(), 400);
                    let parsed: Value = serde_json::from_str(&e.body()).unwrap();
                    prop_assert!(parsed["error"]["message"].is_string());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Through the whole router (a server with no models, so nothing runs): every
    /// answer is a 4xx with an error body.
    #[test]
    fn router_answers_arbitrary_bodies_with_4xx(v in json_value(), chat in any::<bool>()) {
        let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let runtime = Arc::new(afo_runtime::Runtime::builder().build().unwrap());
        let router = Server::builder(runtime).build().unwrap().router();
        let uri = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, body) = tokio.block_on(async move {
            let response = router
                .oneshot(Request::post(uri).body(Body::from(v.to_string())).unwrap())
                .await
                .unwrap();
            let status = response.status();
            (status, response.into_body().collect().await.unwrap().to_bytes())
        });
        prop_assert!(status.is_client_error(), "{}", status);
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        prop_assert!(parsed["error"]["type"].is_string());
    }
}
