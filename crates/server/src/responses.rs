//! OpenAI's Responses API, `POST /v1/responses`, stateless, on the chat path.
//!
//! A request is translated into the chat request it means (`instructions` becomes
//! the system message, `input` a string or its items: `message` items with
//! `input_text` / `input_image` / `output_text` parts, `function_call` items an
//! assistant's `tool_calls`, `function_call_output` items `tool` messages;
//! `max_output_tokens` becomes `max_tokens`, function `tools` their chat form) and
//! parsed by [`parse_chat`](crate::openai::parse_chat): admission, the run context,
//! limits, logging, cancellation and the vision path are the chat route's. Nothing
//! is stored: `store: true`, `previous_response_id`, `conversation` and `background`
//! are refused. The answer is a `response` object whose `output` holds the model's
//! reasoning (a `reasoning` item), its text (a `message` item) and its tool calls
//! (`function_call` items), or the Responses stream of events with their
//! `sequence_number`s; errors keep OpenAI's error shape.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use afo_runtime::engine::FinishReason;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::compat::{
    self, BlockStep, Blocks, TextKind, array, as_obj, boolean, get, missing, number, obj, positive,
    required_string, sse_event, string, unsupported, wrong_type,
};
use crate::error::ApiError;
use crate::openai::{ParseLimits, ParsedRequest};
use crate::routes::{self, Answer, Dialect, Started};
use crate::state::Shared;
use crate::worker::Event;

/// How `/v1/responses` answers; errors are OpenAI's.
const DIALECT: Dialect = Dialect {
    answer,
    error: IntoResponse::into_response,
};

/// `POST /v1/responses`.
pub(crate) async fn responses(State(s): State<Arc<Shared>>, request: Request) -> Response {
    routes::handle(s, request, parse, DIALECT).await
}

/// A request translated into a chat body, and where each of its messages and parts
/// came from.
#[derive(Debug)]
struct Translated {
    chat: Map<String, Value>,
    /// The chat path of each message and part, and the Responses path it came from.
    paths: Vec<(String, String)>,
}

impl Translated {
    /// `param` (a chat path) as the request named it.
    fn rename(&self, param: &str) -> String {
        let renamed = compat::rename(&self.paths, param);
        // `input_image` holds its URL in `image_url` itself.
        match renamed.strip_suffix(".image_url.url") {
            Some(part) if renamed.starts_with("input") => format!("{part}.image_url"),
            _ => renamed,
        }
    }
}

/// Parses and checks a `/v1/responses` body into the chat route's request.
///
/// # Errors
/// A 400 [`ApiError`] naming the field at fault.
pub(crate) fn parse(body: &[u8], limits: &ParseLimits) -> Result<ParsedRequest, ApiError> {
    let m = compat::object(body)?;
    let t = translate(&m)?;
    let req = compat::parse_translated(&t.chat, limits, |p| t.rename(p))?;
    Ok(req)
}

/// Builds the chat messages of the input items.
#[derive(Debug, Default)]
struct Messages {
    out: Vec<Value>,
    paths: Vec<(String, String)>,
}

impl Messages {
    fn push(&mut self, message: Value, from: String) {
        self.paths
            .push((format!("messages[{}]", self.out.len()), from));
        self.out.push(message);
    }

    /// A `message` item (or an item with a `role` and no `type`).
    fn message(&mut self, item: &Map<String, Value>, path: String) -> Result<(), ApiError> {
        let role = required_string(item, "role", &path)?;
        let role = match role {
            "user" | "assistant" | "system" => role,
            "developer" => "system",
            other => {
                return Err(ApiError::invalid(format!(
                    "`{path}.role` is `{other}`; it must be `user`, `assistant`, `system` or `developer`"
                ))
                .param(format!("{path}.role")));
            }
        };
        let content_path = format!("{path}.content");
        let parts = match get(item, "content") {
            None => return Err(missing(&content_path)),
            Some(Value::String(s)) => {
                self.push(json!({"role": role, "content": s}), path);
                return Ok(());
            }
            Some(Value::Array(parts)) => parts,
            Some(other) => {
                return Err(wrong_type(
                    &content_path,
                    "a string or a list of content parts",
                    other,
                ));
            }
        };
        let k = self.out.len();
        let mut out = Vec::with_capacity(parts.len());
        for (j, p) in parts.iter().enumerate() {
            let ppath = format!("{content_path}[{j}]");
            let p = as_obj(p, &ppath)?;
            match required_string(p, "type", &ppath)? {
                "input_text" | "output_text" | "text" | "refusal" => {
                    let key = if p.contains_key("refusal") {
                        "refusal"
                    } else {
                        "text"
                    };
                    let text = required_string(p, key, &ppath)?;
                    out.push(json!({"type": "text", "text": text}));
                }
                "input_image" if role == "user" => {
                    if get(p, "file_id").is_some() {
                        return Err(unsupported(
                            &format!("{ppath}.file_id"),
                            "no files are stored here; send the image as a `data:` URL in `image_url`",
                        ));
                    }
                    let url = string(p, "image_url", &ppath)?
                        .ok_or_else(|| missing(&format!("{ppath}.image_url")))?;
                    out.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "`{ppath}.type` is `{other}`; a {role} message takes `input_text`{} parts here",
                        if role == "user" {
                            ", `input_image`"
                        } else {
                            ", `output_text`"
                        }
                    ))
                    .param(format!("{ppath}.type")));
                }
            }
            self.paths
                .push((format!("messages[{k}].content[{j}]"), ppath));
        }
        self.push(json!({"role": role, "content": out}), path);
        Ok(())
    }

    /// A `function_call` item: joins the assistant message before it when that one
    /// is already calling tools.
    fn function_call(&mut self, item: &Map<String, Value>, path: String) -> Result<(), ApiError> {
        let call_id = required_string(item, "call_id", &path)?;
        let name = required_string(item, "name", &path)?;
        let arguments = required_string(item, "arguments", &path)?;
        let call = json!({
            "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments},
        });
        if let Some(last) = self.out.last_mut()
            && last["role"] == "assistant"
            && let Some(calls) = last.get_mut("tool_calls").and_then(Value::as_array_mut)
        {
            calls.push(call);
            return Ok(());
        }
        self.push(
            json!({"role": "assistant", "content": null, "tool_calls": [call]}),
            path,
        );
        Ok(())
    }

    /// A `function_call_output` item: a `tool` message.
    fn function_output(&mut self, item: &Map<String, Value>, path: String) -> Result<(), ApiError> {
        let call_id = required_string(item, "call_id", &path)?;
        let output = match get(item, "output") {
            None => return Err(missing(&format!("{path}.output"))),
            Some(v) => compat::text_or_parts(
                v,
                &format!("{path}.output"),
                "input_text",
                "a function's output holds `input_text` here",
                "a string or a list of parts",
            )?,
        };
        self.push(
            json!({"role": "tool", "tool_call_id": call_id, "content": output}),
            path,
        );
        Ok(())
    }
}

/// Function `tools` in the chat form.
fn translate_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let path = format!("tools[{i}]");
        let t = as_obj(t, &path)?;
        let kind = required_string(t, "type", &path)?;
        if kind != "function" {
            return Err(unsupported(
                &format!("{path}.type"),
                &format!("`{kind}` is a hosted tool; only `function` tools run here"),
            ));
        }
        let name = required_string(t, "name", &path)?;
        let mut function = json!({"name": name});
        if let Some(p) = obj(t, "parameters", &path)? {
            function["parameters"] = Value::Object(p.clone());
        }
        if let Some(d) = string(t, "description", &path)? {
            function["description"] = json!(d);
        }
        if let Some(strict) = boolean(t, "strict", &path)? {
            function["strict"] = json!(strict);
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out)
}

/// The chat body a Responses request means.
fn translate(m: &Map<String, Value>) -> Result<Translated, ApiError> {
    if boolean(m, "store", "")? == Some(true) {
        return Err(unsupported(
            "store",
            "this server is stateless and stores no responses; send `store: false`",
        ));
    }
    for (field, why) in [
        (
            "previous_response_id",
            "this server is stateless; send the whole conversation in `input`",
        ),
        (
            "conversation",
            "this server is stateless; send the whole conversation in `input`",
        ),
        ("prompt", "no prompt templates are stored here"),
    ] {
        if get(m, field).is_some() {
            return Err(unsupported(field, why));
        }
    }
    if boolean(m, "background", "")? == Some(true) {
        return Err(unsupported(
            "background",
            "responses run in the foreground here",
        ));
    }
    if let Some(include) = array(m, "include", "")?
        && !include.is_empty()
    {
        return Err(unsupported("include", "no extra output data is offered"));
    }
    if number(m, "top_logprobs", "")?.is_some_and(|n| n != 0.0) {
        return Err(unsupported(
            "top_logprobs",
            "log probabilities are not offered on this endpoint",
        ));
    }
    if let Some(reasoning) = obj(m, "reasoning", "")?
        && reasoning.values().any(|v| !v.is_null())
    {
        return Err(unsupported(
            "reasoning",
            "reasoning settings are not offered on this endpoint",
        ));
    }
    let mut chat = Map::new();
    chat.insert("model".into(), json!(required_string(m, "model", "")?));
    let mut messages = Messages::default();
    if let Some(instructions) = string(m, "instructions", "")? {
        messages.push(
            json!({"role": "system", "content": instructions}),
            "instructions".into(),
        );
    }
    match get(m, "input") {
        None => return Err(missing("input")),
        Some(Value::String(s)) => {
            messages.push(json!({"role": "user", "content": s}), "input".into());
        }
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(
                    ApiError::invalid("`input` is empty: give at least one item").param("input"),
                );
            }
            for (i, item) in items.iter().enumerate() {
                let path = format!("input[{i}]");
                let item = as_obj(item, &path)?;
                match string(item, "type", &path)? {
                    Some("message") | None => messages.message(item, path)?,
                    Some("function_call") => messages.function_call(item, path)?,
                    Some("function_call_output") => messages.function_output(item, path)?,
                    // A model's reasoning sent back is not part of the prompt.
                    Some("reasoning") => {}
                    Some("item_reference") => {
                        return Err(unsupported(
                            &format!("{path}.type"),
                            "this server is stateless and keeps no items to refer to",
                        ));
                    }
                    Some(other) => {
                        return Err(ApiError::invalid(format!(
                            "`{path}.type` is `{other}`; input items here are `message`, `function_call`, `function_call_output` and `reasoning`"
                        ))
                        .param(format!("{path}.type")));
                    }
                }
            }
        }
        Some(other) => {
            return Err(wrong_type("input", "a string or a list of items", other));
        }
    }
    if messages.out.is_empty() {
        return Err(ApiError::invalid("`input` holds no message").param("input"));
    }
    chat.insert("messages".into(), Value::Array(messages.out));
    if let Some(n) = positive(m, "max_output_tokens", "")? {
        chat.insert("max_tokens".into(), json!(n));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = number(m, key, "")? {
            chat.insert(key.into(), json!(v));
        }
    }
    if let Some(stream) = boolean(m, "stream", "")? {
        chat.insert("stream".into(), json!(stream));
    }
    if let Some(tools) = array(m, "tools", "")?
        && !tools.is_empty()
    {
        chat.insert("tools".into(), Value::Array(translate_tools(tools)?));
    }
    match get(m, "tool_choice") {
        None => {}
        Some(Value::String(c)) => {
            chat.insert("tool_choice".into(), json!(c));
        }
        Some(Value::Object(c)) => {
            let name = required_string(c, "name", "tool_choice")?;
            chat.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": name}}),
            );
        }
        Some(other) => {
            return Err(wrong_type("tool_choice", "a string or an object", other));
        }
    }
    if let Some(parallel) = boolean(m, "parallel_tool_calls", "")? {
        chat.insert("parallel_tool_calls".into(), json!(parallel));
    }
    // `text.format` is the chat's `response_format`.
    if let Some(text) = obj(m, "text", "")?
        && let Some(format) = obj(text, "format", "text")?
    {
        let kind = required_string(format, "type", "text.format")?;
        let response_format = if kind == "json_schema" {
            let mut schema = format.clone();
            schema.remove("type");
            json!({"type": "json_schema", "json_schema": schema})
        } else {
            json!({"type": kind})
        };
        chat.insert("response_format".into(), response_format);
    }
    Ok(Translated {
        chat,
        paths: messages.paths,
    })
}

fn answer(run: Started) -> Answer {
    Box::pin(async move {
        if run.stream {
            Ok(stream_response(run))
        } else {
            collect_response(run).await
        }
    })
}

/// The reader of a run's output into output items; tool calls get `call_` ids.
fn blocks(run: &mut Started) -> Blocks {
    let prefix = format!("call_{}_", run.run_id);
    Blocks::new(run.take_output().with_id_prefix(prefix))
}

/// A `response` object with `output` items. `finish` is `None` while the run is going.
fn response_object(
    run: &Started,
    output: &[Value],
    finish: Option<(FinishReason, usize)>,
) -> Value {
    let id = format!("resp_{}", run.run_id);
    let Some((finish, output_tokens)) = finish else {
        return json!({
            "id": id, "object": "response", "created_at": run.created, "status": "in_progress",
            "model": run.model, "output": [], "usage": null, "incomplete_details": null,
            "error": null,
        });
    };
    let incomplete = finish == FinishReason::Length;
    let status = if incomplete {
        "incomplete"
    } else {
        "completed"
    };
    let mut output = output.to_vec();
    for item in &mut output {
        item["status"] = json!(status);
    }
    json!({
        "id": id, "object": "response", "created_at": run.created, "status": status,
        "model": run.model,
        "output": output,
        "usage": {
            "input_tokens": run.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": run.prompt_tokens + output_tokens,
        },
        "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "error": null,
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// The output item block `step` opens (a message, a reasoning item or a function
/// call), in progress; `None` for a step that opens nothing.
fn opened_item(run_id: &str, step: &BlockStep) -> Option<Value> {
    match step {
        BlockStep::Open(i, TextKind::Text) => Some(json!({
            "type": "message", "id": format!("msg_{run_id}_{i}"), "role": "assistant",
            "status": "in_progress", "content": [text_part("")],
        })),
        BlockStep::Open(i, TextKind::Reasoning) => Some(json!({
            "type": "reasoning", "id": format!("rs_{run_id}_{i}"), "status": "in_progress",
            "summary": [], "content": [{"type": "reasoning_text", "text": ""}],
        })),
        BlockStep::Call(i, call) => Some(json!({
            "type": "function_call", "id": format!("fc_{run_id}_{i}"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments_json(), "status": "completed",
        })),
        BlockStep::Delta(..) | BlockStep::Close(..) => None,
    }
}

/// Adds `step` to the output items.
fn add_item(output: &mut Vec<Value>, run_id: &str, step: &BlockStep) {
    if let Some(item) = opened_item(run_id, step) {
        output.push(item);
    } else if let BlockStep::Delta(i, _, t) = step
        && let Some(Value::String(text)) = output
            .get_mut(*i)
            .and_then(|item| item.pointer_mut("/content/0/text"))
    {
        text.push_str(t);
    }
}

/// The text of output item `i`.
fn item_text(output: &[Value], i: usize) -> String {
    output
        .get(i)
        .and_then(|item| item.pointer("/content/0/text"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

async fn collect_response(mut run: Started) -> Result<Response, ApiError> {
    let mut blocks = blocks(&mut run);
    let mut output = Vec::new();
    loop {
        match run.rx.recv().await {
            Some(Event::Text(t)) => {
                for step in blocks.push(&t) {
                    add_item(&mut output, &run.run_id, &step);
                }
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the worker went away")),
            Some(Event::Done(d)) => {
                for step in blocks.finish() {
                    add_item(&mut output, &run.run_id, &step);
                }
                if output.is_empty() {
                    // Nothing said: an empty message, as OpenAI answers.
                    let step = BlockStep::Open(0, TextKind::Text);
                    add_item(&mut output, &run.run_id, &step);
                }
                let body = response_object(&run, &output, Some((d.finish, d.completion_tokens)));
                return Ok(axum::Json(body).into_response());
            }
            Some(_) => {}
        }
    }
}

struct StreamState {
    run: Started,
    blocks: Blocks,
    output: Vec<Value>,
    sequence: u64,
    queue: VecDeque<String>,
    ended: bool,
}

impl StreamState {
    /// Queues event `name` with `data`, numbered.
    fn push(&mut self, name: &str, mut data: Value) {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.queue.push_back(sse_event(name, &data));
    }

    fn fail(&mut self, e: &ApiError) {
        self.push(
            "error",
            json!({"code": e.code, "message": e.message, "param": e.param}),
        );
        let mut response = response_object(&self.run, &[], None);
        response["status"] = json!("failed");
        response["error"] = json!({"code": e.code.unwrap_or("server_error"), "message": e.message});
        self.push("response.failed", json!({"response": response}));
        self.ended = true;
    }

    /// The events of `steps`, and the output items they make.
    fn steps(&mut self, steps: Vec<BlockStep>) {
        for step in steps {
            add_item(&mut self.output, &self.run.run_id, &step);
            match step {
                BlockStep::Open(i, kind) => {
                    let mut item = self.output[i].clone();
                    item["content"] = json!([]);
                    self.push(
                        "response.output_item.added",
                        json!({"output_index": i, "item": item}),
                    );
                    let id = self.output[i]["id"].clone();
                    let part = match kind {
                        TextKind::Text => text_part(""),
                        TextKind::Reasoning => json!({"type": "reasoning_text", "text": ""}),
                    };
                    self.push(
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": i, "content_index": 0, "part": part}),
                    );
                }
                BlockStep::Delta(i, kind, t) => {
                    let (name, extra) = match kind {
                        TextKind::Text => ("response.output_text.delta", json!([])),
                        TextKind::Reasoning => ("response.reasoning_text.delta", Value::Null),
                    };
                    let mut data = json!({"item_id": self.output[i]["id"], "output_index": i,
                                          "content_index": 0, "delta": t});
                    if !extra.is_null() {
                        data["logprobs"] = extra;
                    }
                    self.push(name, data);
                }
                BlockStep::Close(i, kind) => {
                    let id = self.output[i]["id"].clone();
                    let text = item_text(&self.output, i);
                    let (name, part) = match kind {
                        TextKind::Text => ("response.output_text.done", text_part(&text)),
                        TextKind::Reasoning => (
                            "response.reasoning_text.done",
                            json!({"type": "reasoning_text", "text": text}),
                        ),
                    };
                    let mut data =
                        json!({"item_id": id, "output_index": i, "content_index": 0, "text": text});
                    if kind == TextKind::Text {
                        data["logprobs"] = json!([]);
                    }
                    self.push(name, data);
                    self.push(
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": i, "content_index": 0, "part": part}),
                    );
                    let mut item = self.output[i].clone();
                    item["status"] = json!("completed");
                    self.push(
                        "response.output_item.done",
                        json!({"output_index": i, "item": item}),
                    );
                }
                BlockStep::Call(i, call) => {
                    let mut item = self.output[i].clone();
                    let id = item["id"].clone();
                    let arguments = call.arguments_json();
                    item["arguments"] = json!("");
                    item["status"] = json!("in_progress");
                    self.push(
                        "response.output_item.added",
                        json!({"output_index": i, "item": item}),
                    );
                    self.push(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": i, "delta": arguments}),
                    );
                    self.push(
                        "response.function_call_arguments.done",
                        json!({"item_id": id, "output_index": i, "name": call.name,
                               "arguments": arguments}),
                    );
                    self.push(
                        "response.output_item.done",
                        json!({"output_index": i, "item": self.output[i].clone()}),
                    );
                }
            }
        }
    }
}

/// The event stream: `response.created`, `response.in_progress`, then for each
/// output item `response.output_item.added`, its content (a message's
/// `response.content_part.added`, `response.output_text.delta`s,
/// `response.output_text.done` and `response.content_part.done`; a reasoning item's
/// `response.reasoning_text.delta`s and `.done`; a function call's
/// `response.function_call_arguments.delta` and `.done`) and
/// `response.output_item.done`, then `response.completed` (or
/// `response.incomplete` when `max_output_tokens` ran out); a failed run ends with
/// `error` and `response.failed`. Dropping the body (the client went away) drops the
/// receiver, which cancels the run.
fn stream_response(mut run: Started) -> Response {
    let mut st = StreamState {
        blocks: blocks(&mut run),
        run,
        output: Vec::new(),
        sequence: 0,
        queue: VecDeque::new(),
        ended: false,
    };
    let created = response_object(&st.run, &[], None);
    st.push("response.created", json!({"response": created}));
    st.push("response.in_progress", json!({"response": created}));
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(event) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.ended {
                return None;
            }
            match st.run.rx.recv().await {
                Some(Event::Text(t)) => {
                    let steps = st.blocks.push(&t);
                    st.steps(steps);
                }
                Some(Event::Done(d)) => {
                    let mut steps = st.blocks.finish();
                    if st.output.is_empty() && steps.is_empty() {
                        steps = vec![
                            BlockStep::Open(0, TextKind::Text),
                            BlockStep::Close(0, TextKind::Text),
                        ];
                    }
                    st.steps(steps);
                    let response =
                        response_object(&st.run, &st.output, Some((d.finish, d.completion_tokens)));
                    let last = if response["status"] == "incomplete" {
                        "response.incomplete"
                    } else {
                        "response.completed"
                    };
                    st.push(last, json!({"response": response}));
                    st.ended = true;
                }
                Some(Event::Failed(e)) => st.fail(&e),
                None => st.fail(&ApiError::internal("the worker went away")),
                Some(_) => {}
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::internal("building the stream response").into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::openai::PromptInput;

    fn parse_value(v: Value) -> Result<ParsedRequest, ApiError> {
        parse(v.to_string().as_bytes(), &ParseLimits::default())
    }

    #[test]
    fn input_items_translate() {
        let r = parse_value(json!({
            "model": "m", "instructions": "be brief", "max_output_tokens": 9,
            "input": [
                {"role": "user", "content": "hi"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rule"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"}]},
            ],
            "temperature": 0, "stream": true, "store": false,
        }))
        .unwrap();
        let PromptInput::Chat(m) = &r.prompt else {
            panic!("chat")
        };
        let roles: Vec<_> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "system", "user"]);
        assert_eq!(m[4].text, "a\nb");
        assert_eq!(r.sampling.max_tokens, Some(9));
        assert!(r.stream);
        let r = parse_value(json!({"model": "m", "input": "just text"})).unwrap();
        assert_eq!(r.prompt.routing_text(), "just text");
    }

    #[test]
    fn function_items_become_tool_calls_and_tool_messages() {
        let t = translate(
            json!({"model": "m", "input": [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get"}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        let m = t.chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[1]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
        );
        assert_eq!(t.chat["tools"][0]["function"]["name"], "get");
        assert_eq!(t.chat["tool_choice"]["function"]["name"], "get");
    }

    #[test]
    fn bad_requests_name_the_field() {
        let base = || json!({"model": "m", "input": "x"});
        let with = |key: &str, v: Value| {
            let mut b = base();
            b[key] = v;
            b
        };
        let cases = [
            (json!({"model": "m"}), "input"),
            (with("input", json!([])), "input"),
            (with("store", json!(true)), "store"),
            (
                with("previous_response_id", json!("resp_1")),
                "previous_response_id",
            ),
            (with("max_output_tokens", json!(0)), "max_output_tokens"),
            (with("temperature", json!(3)), "temperature"),
            (
                with("input", json!([{"role": "robot", "content": "x"}])),
                "input[0].role",
            ),
            (
                with(
                    "input",
                    json!([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]),
                ),
                "input[0].content[0].type",
            ),
            (
                with(
                    "input",
                    json!([{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]),
                ),
                "input[0].content[0].image_url",
            ),
            (
                with("tools", json!([{"type": "web_search"}])),
                "tools[0].type",
            ),
            (
                with("input", json!([{"type": "item_reference", "id": "x"}])),
                "input[0].type",
            ),
        ];
        for (body, param) in cases {
            let e = parse_value(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body} -> {}", e.message);
        }
    }
}
