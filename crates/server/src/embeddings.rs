//! `POST /v1/embeddings`: OpenAI's embeddings API over [`Runtime::embed`], a decoder's
//! pooled, normalised final hidden states.
//!
//! The body: `model` (a served id, or `auto`), `input` (a string, a list of strings,
//! a list of token ids, or a list of token-id lists), `encoding_format` (`float`, the
//! default, or `base64`: each vector's little-endian f32 bytes, as OpenAI sends
//! them), `dimensions` (keep the first `n` values and normalise again; meaningful only
//! for models trained for it, Matryoshka-style), `user` (ignored) and the extension
//! `pooling` (`last`, the default, or `mean`). Limits: [`MAX_INPUTS`] inputs and
//! [`MAX_TOTAL_TOKENS`] tokens a request, each input within the model's context; past
//! them a 400 names the field. A run goes through the runtime's one admission and
//! writes one SSOT record (`chain: "embeddings"`).
//!
//! [`Runtime::embed`]: afo_runtime::Runtime::embed

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use afo_runtime::engine::{EmbedOptions, Pooling, VisionLanguageModel};
use afo_runtime::guard::MemoryKind;
use afo_runtime::{EMBEDDINGS_CHAIN, EmbedInput, EmbedRequest};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::Shared;

/// The most inputs one request may carry (OpenAI's limit).
pub(crate) const MAX_INPUTS: usize = 2048;
/// The most tokens all inputs of one request may have together.
pub(crate) const MAX_TOTAL_TOKENS: usize = 65_536;

/// How the vectors are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// JSON numbers.
    Float,
    /// Base64 of the little-endian f32 bytes.
    Base64,
}

/// A parsed embeddings request.
#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    model: String,
    inputs: Vec<EmbedInput>,
    encoding: Encoding,
    options: EmbedOptions,
}

/// Parses and checks a request body; every refusal names its field.
fn parse(body: &[u8]) -> Result<Parsed, ApiError> {
    let v: Value = crate::openai::parse_json(body)?;
    let Value::Object(map) = v else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let model = match map.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(ApiError::invalid("`model` must be a non-empty string").param("model"));
        }
        None => return Err(ApiError::invalid("`model` is required").param("model")),
    };
    let inputs = parse_input(map.get("input"))?;
    let encoding = match map.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "`encoding_format` must be `float` or `base64`, not {other}"
            ))
            .param("encoding_format"));
        }
    };
    let dimensions = match map.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => match d.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(ApiError::invalid(format!(
                    "`dimensions` must be a positive integer, not {d}"
                ))
                .param("dimensions"));
            }
        },
    };
    let pooling = match map.get("pooling") {
        None | Some(Value::Null) => Pooling::default(),
        Some(Value::String(s)) => s
            .parse::<Pooling>()
            .map_err(|e| ApiError::invalid(e.to_string()).param("pooling"))?,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "`pooling` must be `last` or `mean`, not {other}"
            ))
            .param("pooling"));
        }
    };
    if let Some(user) = map.get("user")
        && !user.is_string()
        && !user.is_null()
    {
        return Err(ApiError::invalid("`user` must be a string").param("user"));
    }
    Ok(Parsed {
        model,
        inputs,
        encoding,
        options: EmbedOptions {
            pooling,
            dimensions,
        },
    })
}

/// `input`: a string, a list of strings, a list of token ids, or a list of token-id
/// lists.
fn parse_input(input: Option<&Value>) -> Result<Vec<EmbedInput>, ApiError> {
    let bad = |message: String| ApiError::invalid(message).param("input");
    let tokens = |list: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        list.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "{at}: token ids are integers from 0 to 4294967295, not {t}"
                        ))
                    })
            })
            .collect()
    };
    let inputs = match input {
        None | Some(Value::Null) => return Err(bad("`input` is required".to_owned())),
        Some(Value::String(s)) => vec![EmbedInput::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad("`input` is an empty list".to_owned()));
        }
        Some(Value::Array(items)) if items.len() > MAX_INPUTS => {
            return Err(bad(format!(
                "`input` has {} items; the limit is {MAX_INPUTS}",
                items.len()
            )));
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::Number(_) => vec![EmbedInput::Tokens(tokens(items, "`input`")?)],
            Value::String(_) | Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(EmbedInput::Text(s.clone())),
                    Value::Array(ids) => {
                        Ok(EmbedInput::Tokens(tokens(ids, &format!("`input[{i}]`"))?))
                    }
                    other => Err(bad(format!(
                        "`input[{i}]` is {other}; a list holds strings or lists of token ids"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => {
                return Err(bad(format!(
                    "`input[0]` is {other}; `input` is a string, a list of strings, a list of token ids or a list of token-id lists"
                )));
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "`input` is {other}; it is a string, a list of strings, a list of token ids or a list of token-id lists"
            )));
        }
    };
    for (i, input) in inputs.iter().enumerate() {
        let empty = match input {
            EmbedInput::Text(s) => s.is_empty(),
            EmbedInput::Tokens(ids) => ids.is_empty(),
        };
        if empty {
            return Err(bad(format!("`input[{i}]` is empty")));
        }
    }
    Ok(inputs)
}

/// A runtime error as the API answers it.
fn api_error(e: &afo_runtime::Error) -> ApiError {
    use afo_runtime::Error as E;
    use afo_runtime::engine::Error as Engine;
    match e {
        E::EmbedInput { .. } => ApiError::invalid(e.to_string()).param("input"),
        E::EmbedTooManyTokens { .. } => ApiError::invalid(e.to_string())
            .param("input")
            .code("too_many_tokens"),
        E::Engine(Engine::InvalidEmbedOption { name, .. }) => {
            ApiError::invalid(e.to_string()).param(*name)
        }
        _ if e.is_refusal() => ApiError::unavailable(
            format!("the request cannot run under the cutline now: {e}"),
            "memory_unavailable",
            10,
        ),
        _ => ApiError::internal(e.to_string()),
    }
}

/// The response body: the vectors, in input order, and the tokens of all inputs.
fn body(embeddings: &[Vec<f32>], tokens: usize, model: &str, encoding: Encoding) -> Value {
    let data: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = match encoding {
                Encoding::Float => json!(v),
                Encoding::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(State(s): State<Arc<Shared>>, request: Request) -> Response {
    let received = Instant::now();
    let mut model = None;
    let result = run(&s, request, &mut model).await;
    match result {
        Ok(response) => response,
        Err((e, recorded)) => {
            if !recorded {
                s.record_rejection_in(EMBEDDINGS_CHAIN, model.as_deref(), &e, received);
            }
            e.into_response()
        }
    }
}

/// Reads, parses and runs a request; an error says whether the runtime wrote its
/// record already.
async fn run(
    s: &Arc<Shared>,
    request: Request,
    model: &mut Option<String>,
) -> Result<Response, (ApiError, bool)> {
    let early = |e: ApiError| (e, false);
    if !s.accepting.load(Ordering::SeqCst) {
        return Err(early(ApiError::unavailable(
            "the server is shutting down",
            "shutting_down",
            5,
        )));
    }
    let bytes = crate::routes::read_body(s, request).await.map_err(early)?;
    // The body and what is parsed from it are in the ledger while they live.
    let len = bytes.len() as u64;
    let mut held = s.runtime.hold(MemoryKind::Workspace, 2 * len);
    let parsed = tokio::task::spawn_blocking(move || parse(&bytes))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("parsing failed: {e}"))))
        .map_err(early)?;
    held.shrink_to(MemoryKind::Workspace, len);
    *model = Some(parsed.model.clone());
    let routing = match parsed.inputs.first() {
        Some(EmbedInput::Text(t)) => t.clone(),
        _ => String::new(),
    };
    let target = s.resolve(&parsed.model, &routing, 0).map_err(early)?;
    if VisionLanguageModel::is_vlm_dir(&target.spec.path) {
        return Err(early(
            ApiError::invalid(format!(
                "model `{}` is a vision-language model; embeddings come from text models",
                target.spec.id
            ))
            .param("model")
            .code("model_not_supported"),
        ));
    }
    let mut request = EmbedRequest::new(&target.spec.path, parsed.inputs)
        .with_options(parsed.options)
        .with_max_total_tokens(MAX_TOTAL_TOKENS);
    request.scheme = target.spec.scheme;
    let runtime = Arc::clone(&s.runtime);
    let result = tokio::task::spawn_blocking(move || {
        let r = runtime.embed(&request);
        drop(held);
        r
    })
    .await
    .map_err(|e| early(ApiError::internal(format!("embedding task failed: {e}"))))?;
    match result {
        Ok(response) => {
            let v = body(
                &response.embeddings,
                response.prompt_tokens(),
                &target.spec.id,
                parsed.encoding,
            );
            Ok(axum::Json(v).into_response())
        }
        Err(e) => Err((api_error(&e), true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn every_input_shape_parses() {
        let p = parse(br#"{"model":"m","input":"hi"}"#).unwrap();
        assert_eq!(p.inputs, [EmbedInput::Text("hi".into())]);
        assert_eq!(p.encoding, Encoding::Float);
        assert_eq!(p.options, EmbedOptions::default());
        let p = parse(br#"{"model":"m","input":["a","b"],"encoding_format":"base64","dimensions":8,"pooling":"mean"}"#).unwrap();
        assert_eq!(p.inputs.len(), 2);
        assert_eq!(p.encoding, Encoding::Base64);
        assert_eq!(p.options.dimensions, Some(8));
        assert_eq!(p.options.pooling, Pooling::Mean);
        let p = parse(br#"{"model":"m","input":[1,2,3]}"#).unwrap();
        assert_eq!(p.inputs, [EmbedInput::Tokens(vec![1, 2, 3])]);
        let p = parse(br#"{"model":"m","input":[[1,2],[3]]}"#).unwrap();
        assert_eq!(
            p.inputs,
            [EmbedInput::Tokens(vec![1, 2]), EmbedInput::Tokens(vec![3])]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"input":"x"}"#, "model"),
            (r#"{"model":"m"}"#, "input"),
            (r#"{"model":"m","input":[]}"#, "input"),
            (r#"{"model":"m","input":[""]}"#, "input"),
            (r#"{"model":"m","input":[1,-2]}"#, "input"),
            (r#"{"model":"m","input":[[1],"a",3]}"#, "input"),
            (r#"{"model":"m","input":{"a":1}}"#, "input"),
            (
                r#"{"model":"m","input":"x","encoding_format":"hex"}"#,
                "encoding_format",
            ),
            (r#"{"model":"m","input":"x","dimensions":0}"#, "dimensions"),
            (
                r#"{"model":"m","input":"x","dimensions":"8"}"#,
                "dimensions",
            ),
            (r#"{"model":"m","input":"x","pooling":"cls"}"#, "pooling"),
            (r#"{"model":"m","input":"x","user":5}"#, "user"),
        ];
        for (body, param) in cases {
            let e = err(body);
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
        let many = format!(
            r#"{{"model":"m","input":[{}]}}"#,
            vec!["\"a\""; MAX_INPUTS + 1].join(",")
        );
        let e = err(&many);
        assert!(
            e.message.contains("2049") && e.message.contains("2048"),
            "{e}"
        );
    }

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        let vectors = [vec![1.0f32, -0.5]];
        let v = body(&vectors, 3, "m", Encoding::Base64);
        let text = v["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat()
        );
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        let v = body(&vectors, 3, "m", Encoding::Float);
        assert_eq!(v["data"][0]["embedding"], json!([1.0, -0.5]));
    }
}
