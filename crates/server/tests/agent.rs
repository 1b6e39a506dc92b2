//! The agent-facing API over the real SmolLM2 model: `response_format` (JSON schema
//! and JSON object), forced tool calls (whole and streamed), log-probabilities, `n`
//! choices and seeds on the chat route, and tool calls coming back as Anthropic
//! `tool_use` blocks and Responses `function_call` items.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{Value, json};

/// A schema with nested objects, an enum, an array and required fields, each value
/// bounded so that a small model's output ends.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "mood": {"enum": ["happy", "sad", "calm"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "mood", "tags", "address"],
        "additionalProperties": false
    })
}

/// Checks `v` against [`person_schema`] by hand.
fn valid_person(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    if sorted != ["address", "mood", "name", "tags"] {
        return Err(format!("keys {keys:?}"));
    }
    let name = o["name"].as_str().ok_or("name is not a string")?;
    if name.chars().count() > 16 {
        return Err("name too long".into());
    }
    if !matches!(o["mood"].as_str(), Some("happy" | "sad" | "calm")) {
        return Err(format!("mood {}", o["mood"]));
    }
    let tags = o["tags"].as_array().ok_or("tags is not an array")?;
    if tags.len() > 3
        || !tags
            .iter()
            .all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 8))
    {
        return Err(format!("tags {tags:?}"));
    }
    let address = o["address"].as_object().ok_or("address is not an object")?;
    if address.len() != 2
        || !address["city"].is_string()
        || address["zip"].as_u64().is_none_or(|z| z > 99999)
    {
        return Err(format!("address {address:?}"));
    }
    Ok(())
}

fn chat(messages: Value, extra: Value) -> Value {
    let mut body = json!({"model": MODEL_ID, "messages": messages, "max_tokens": 160});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_output_always_parses_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    // Sampled at temperature 1 with different seeds: every output validates.
    for seed in 0..4 {
        let body = chat(
            user("Describe a person who lives in a city."),
            json!({"response_format": format, "seed": seed, "temperature": 1.0}),
        );
        let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {text}"));
        valid_person(&parsed).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    // Streamed, the deltas make the same kind of document.
    let body = chat(
        user("Describe a person."),
        json!({"response_format": format, "temperature": 0, "stream": true}),
    );
    let (status, _, sse) = send(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let text: String = sse_events(&sse)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    valid_person(&serde_json::from_str(&text).unwrap()).unwrap();

    // `json_object`: any object.
    let body = chat(
        user("Give me a JSON object about cats."),
        json!({"response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 200}),
    );
    let (_, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }

    // Completions take it too.
    let body = json!({"model": MODEL_ID, "prompt": "A person:", "max_tokens": 160,
                      "temperature": 0, "response_format": format});
    let (_, _, v) = send_json(&router, post("/v1/completions", &body)).await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    valid_person(&serde_json::from_str(text).unwrap()).unwrap();

    // Bad formats are a 400 naming the field, before anything runs.
    for (format, param) in [
        (json!({"type": "yaml"}), "response_format.type"),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
            "response_format.json_schema.schema",
        ),
        (json!("json"), "response_format"),
    ] {
        let body = chat(user("hi"), json!({"response_format": format}));
        let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{format}: {v}");
        assert_eq!(error_of(&v)["param"], param, "{v}");
    }
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "The time in a time zone",
            "parameters": {"type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 20}},
                "required": ["zone"]}}}
    ])
}

/// Checks one OpenAI tool call against [`weather_tools`]; returns its name.
fn valid_call(call: &Value) -> String {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{call}"
    );
    let name = call["function"]["name"].as_str().unwrap().to_owned();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    match name.as_str() {
        "get_weather" => {
            assert!(args["city"].is_string(), "{call}");
            assert!(
                matches!(args["unit"].as_str(), Some("celsius" | "fahrenheit")),
                "{call}"
            );
        }
        "get_time" => assert!(args["zone"].is_string(), "{call}"),
        other => panic!("unknown tool {other}"),
    }
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_are_well_formed_whole_and_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let ask = user("What is the weather in Paris?");
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let body = chat(
            ask.clone(),
            json!({"tools": weather_tools(), "tool_choice": choice, "temperature": 0}),
        );
        let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let choice0 = &v["choices"][0];
        assert_eq!(choice0["finish_reason"], "tool_calls", "{v}");
        let calls = choice0["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{v}");
        let names: Vec<String> = calls.iter().map(valid_call).collect();
        if choice.is_object() {
            assert!(names.iter().all(|n| n == "get_weather"), "{names:?}");
        }

        // Streamed: the calls come as deltas with their index, whole.
        let mut body = body.clone();
        body["stream"] = json!(true);
        let (status, _, sse) = send(&router, post("/v1/chat/completions", &body)).await;
        assert_eq!(status, StatusCode::OK);
        let mut streamed = Vec::new();
        let mut finish = Value::Null;
        for e in sse_events(&sse).iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(e).unwrap();
            if let Some(calls) = v["choices"][0]["delta"]["tool_calls"].as_array() {
                for c in calls {
                    assert_eq!(c["index"], streamed.len(), "{c}");
                    streamed.push(c.clone());
                }
            }
            if !v["choices"][0]["finish_reason"].is_null() {
                finish = v["choices"][0]["finish_reason"].clone();
            }
        }
        assert_eq!(finish, "tool_calls");
        assert_eq!(streamed.len(), calls.len());
        for (s, w) in streamed.iter().zip(calls) {
            valid_call(s);
            assert_eq!(s["function"], w["function"], "greedy: the same calls");
        }
    }

    // The call and its result go back into the history.
    let call = json!({"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}});
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}
    ]);
    let body = chat(
        messages,
        json!({"tools": weather_tools(), "temperature": 0, "max_tokens": 24}),
    );
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 40, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_choices_and_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();
    let ask = user("Name three colours.");

    // Greedy with logprobs: each token is the most likely of its step.
    let body = chat(
        ask.clone(),
        json!({"temperature": 0, "max_tokens": 8, "logprobs": true, "top_logprobs": 3}),
    );
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut text = String::new();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(
            top[0]["token"], t["token"],
            "greedy picks the top token: {t}"
        );
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(
            top.windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
        text.push_str(t["token"].as_str().unwrap());
    }
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // n = 3: three choices, indexed; the same seed gives the same three again.
    let body = chat(
        ask.clone(),
        json!({"temperature": 1.0, "max_tokens": 12, "n": 3, "seed": 7}),
    );
    let (status, _, a) = send_json(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{a}");
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{a}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    let (_, _, b) = send_json(&router, post("/v1/chat/completions", &body)).await;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b), "the same seed, the same choices");
    let distinct: std::collections::HashSet<String> = texts(&a).into_iter().collect();
    assert!(distinct.len() > 1, "choices differ: {:?}", texts(&a));
    let completion_tokens: u64 = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion_tokens > 12, "usage counts every choice: {a}");

    // logit_bias: a token pushed to +100 is every token; the greedy first token
    // pushed to -100 is never chosen.
    let body = chat(
        ask.clone(),
        json!({"logit_bias": {"28": 100}, "temperature": 0, "max_tokens": 4, "logprobs": true}),
    );
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let tokens: Vec<&str> = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 4, "{v}");
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    let first = content[0]["token"].as_str().unwrap();
    let (_, _, v0) = send_json(
        &router,
        post(
            "/v1/completions",
            &json!({"model": MODEL_ID, "prompt": first, "max_tokens": 1, "logprobs": 1}),
        ),
    )
    .await;
    assert_eq!(
        v0["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{v0}"
    );
    let (status, _, v) = send_json(
        &router,
        post(
            "/v1/chat/completions",
            &chat(ask, json!({"logit_bias": {"999999": 1}})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_of(&v)["param"], "logit_bias");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_come_back_as_tool_use_blocks_and_function_call_items() {
    let dir = tempfile::tempdir().unwrap();
    let server = builder(dir.path(), "20GiB").build().unwrap();
    let router = server.router();

    // Anthropic: `tool_choice: any` forces a call; it is a `tool_use` block.
    let tools = json!([{"name": "get_weather", "description": "The weather in a city",
        "input_schema": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}]);
    let body = json!({"model": MODEL_ID, "max_tokens": 160, "temperature": 0,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools, "tool_choice": {"type": "any", "disable_parallel_tool_use": true}});
    let request = |body: &Value| {
        Request::post("/v1/messages")
            .header("content-type", "application/json")
            .header("anthropic-version", "2023-06-01")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (status, _, v) = send_json(&router, request(&body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    let block = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap_or_else(|| panic!("no tool_use block: {v}"))
        .clone();
    assert_eq!(block["name"], "get_weather");
    assert!(
        block["id"].as_str().unwrap().starts_with("toolu_"),
        "{block}"
    );
    assert!(block["input"]["city"].is_string(), "{block}");
    // Streamed: the block's input arrives as `input_json_delta`.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&router, request(&streamed)).await;
    let partial: String = sse
        .split("\n\n")
        .filter_map(|e| e.split_once("\ndata: ").map(|(_, d)| d))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|d| d["delta"]["type"] == "input_json_delta")
        .map(|d| d["delta"]["partial_json"].as_str().unwrap().to_owned())
        .collect();
    let input: Value = serde_json::from_str(&partial).unwrap();
    assert_eq!(input, block["input"], "greedy: the same call streamed");
    assert!(sse.contains("\"stop_reason\":\"tool_use\""), "{sse}");

    // The tool result goes back: a `tool_result` block answers the `tool_use`.
    let follow = json!({"model": MODEL_ID, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": [block.clone()]},
                     {"role": "user", "content": [{"type": "tool_result",
                        "tool_use_id": block["id"], "content": "18 degrees"}]}],
        "tools": tools});
    let (status, _, v) = send_json(&router, request(&follow)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"][0]["type"], "text", "{v}");

    // Responses: a forced call is a `function_call` item, whole and streamed.
    let body = json!({"model": MODEL_ID, "input": "Weather in Paris?", "max_output_tokens": 160,
        "temperature": 0, "parallel_tool_calls": false,
        "tools": [{"type": "function", "name": "get_weather",
                   "parameters": tools[0]["input_schema"]}],
        "tool_choice": "required"});
    let (status, _, v) = send_json(&router, post("/v1/responses", &body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let item = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("no function_call item: {v}"))
        .clone();
    assert_eq!(item["name"], "get_weather");
    let args: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{item}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&router, post("/v1/responses", &streamed)).await;
    let done: Vec<Value> = sse
        .split("\n\n")
        .filter_map(|e| e.split_once("\ndata: ").map(|(_, d)| d))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|d| d["type"] == "response.function_call_arguments.done")
        .collect();
    assert_eq!(done.len(), 1, "{sse}");
    assert_eq!(done[0]["arguments"], item["arguments"]);
    let completed = sse
        .split("\n\n")
        .filter_map(|e| e.split_once("\ndata: ").map(|(_, d)| d))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|d| d["type"] == "response.completed")
        .unwrap_or_else(|| panic!("no response.completed: {sse}"));
    let calls: Vec<&Value> = completed["response"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "function_call")
        .collect();
    assert_eq!(calls.len(), 1, "{completed}");
    assert_eq!(calls[0]["name"], item["name"]);
    assert_eq!(
        calls[0]["arguments"], item["arguments"],
        "greedy: the same call streamed"
    );
}

/// A Qwen3-style template that thinks: the generation prompt opens `<think>` unless
/// `enable_thinking` is false, when it writes an empty block.
const THINKING_TEMPLATE: &str = "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}\
{%- if add_generation_prompt %}<|im_start|>assistant\n\
{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- else %}<think>\n{%- endif %}\
{%- endif %}";

/// The tiny seeded Qwen3 text checkpoint (byte-level tokenizer) with
/// [`THINKING_TEMPLATE`], served as `tiny-qwen3`.
fn thinking_server(dir: &std::path::Path) -> afo_server::Server {
    let model = dir.join("qwen3");
    afo_runtime::engine::TinyVlm::default()
        .write_language_model(&model)
        .unwrap();
    let path = model.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = json!(THINKING_TEMPLATE);
    std::fs::write(&path, config.to_string()).unwrap();
    afo_server::Server::builder(runtime(&dir.join("runs.jsonl"), "20GiB"))
        .model_as("tiny-qwen3", model, None)
        .build()
        .unwrap()
}

/// Greedy, with the model's own way out of the block (`<`, byte 60) and its special
/// tokens (256-261, end of sequence among them) biased away: its noise can neither
/// close the block nor stop, so only the budget ends the reasoning.
fn thinking_request(extra: Value) -> Value {
    let mut body = json!({"model": "tiny-qwen3", "max_tokens": 30, "temperature": 0,
        "messages": [{"role": "user", "content": "Think, then answer."}],
        "logit_bias": {"60": -100, "256": -100, "257": -100, "258": -100, "259": -100,
                       "260": -100, "261": -100}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_separated_streamed_and_capped_on_a_thinking_qwen3() {
    let dir = tempfile::tempdir().unwrap();
    let server = thinking_server(dir.path());
    let router = server.router();

    // No budget: the block never closes, so everything is reasoning.
    let (status, _, v) = send_json(
        &router,
        post("/v1/chat/completions", &thinking_request(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let m = &v["choices"][0]["message"];
    let all = m["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(!all.is_empty(), "{v}");
    assert!(m["content"].as_str().is_none_or(str::is_empty), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 30);

    // A budget of 6: six tokens of reasoning, then `</think>` (8 byte tokens, forced),
    // then the answer; the reasoning is the first six tokens of the free run.
    let capped = thinking_request(json!({"max_reasoning_tokens": 6}));
    let (status, _, v) = send_json(&router, post("/v1/chat/completions", &capped)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let m = &v["choices"][0]["message"];
    let reasoning = m["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    let content = m["content"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(!reasoning.is_empty() && !content.is_empty(), "{v}");
    assert!(
        all.starts_with(reasoning) && reasoning.len() < all.len(),
        "{reasoning:?} / {all:?}"
    );
    assert!(!content.contains("</think>"), "{content:?}");
    assert_eq!(v["usage"]["completion_tokens"], 30);

    // Streamed: reasoning deltas first, then content deltas; the same text.
    let mut streamed = capped.clone();
    streamed["stream"] = json!(true);
    let (status, _, sse) = send(&router, post("/v1/chat/completions", &streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let (mut r, mut c, mut content_started) = (String::new(), String::new(), false);
    for e in sse_events(&sse).iter().filter(|e| *e != "[DONE]") {
        let d: Value = serde_json::from_str(e).unwrap();
        let delta = &d["choices"][0]["delta"];
        if let Some(t) = delta["reasoning_content"].as_str() {
            assert!(!content_started, "reasoning after content: {sse}");
            r.push_str(t);
        }
        if let Some(t) = delta["content"].as_str() {
            content_started |= !t.is_empty();
            c.push_str(t);
        }
    }
    assert_eq!((r.as_str(), c.as_str()), (reasoning, content));

    // Thinking off: the template writes an empty block and the output is the answer.
    let off = thinking_request(json!({"chat_template_kwargs": {"enable_thinking": false}}));
    let (_, _, v) = send_json(&router, post("/v1/chat/completions", &off)).await;
    let m = &v["choices"][0]["message"];
    assert!(m["reasoning_content"].is_null(), "{v}");
    assert!(!m["content"].as_str().unwrap().is_empty(), "{v}");

    // Anthropic's extended thinking: a `thinking` block, then a `text` block.
    let mut body = thinking_request(json!({"thinking": {"type": "enabled", "budget_tokens": 6}}));
    body.as_object_mut().unwrap().remove("logit_bias");
    let request = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, _, v) = send_json(&router, request).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["content"][0]["type"], "thinking", "{v}");
    assert!(
        !v["content"][0]["thinking"].as_str().unwrap().is_empty(),
        "{v}"
    );
    assert!(
        v["content"].as_array().unwrap().len() == 1 || v["content"][1]["type"] == "text",
        "{v}"
    );
}
