//! Anthropic's Messages API, `POST /v1/messages`, on the chat path.
//!
//! A request is translated into the OpenAI chat request it means (`system` becomes
//! the first message, text and base64 `image` blocks become `text` and `image_url`
//! parts, `stop_sequences` becomes `stop`, `tools` and `tool_choice` their OpenAI
//! forms, `tool_use` blocks an assistant's `tool_calls`, `tool_result` blocks `tool`
//! messages, `thinking` the template's `enable_thinking` and its `budget_tokens` the
//! reasoning budget) and parsed by [`parse_chat`]: admission, the run context,
//! limits, logging, cancellation and the vision path are the chat route's. The answer
//! is written back as a `message` object whose content blocks are the model's
//! thinking, its text and its `tool_use` calls, or as Anthropic's stream of named
//! events; errors as `{"type": "error", "error": {"type", "message"}}`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use afo_runtime::engine::{FinishReason, ToolCall};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::compat::{
    self, BlockStep, Blocks, TextKind, array, as_obj, boolean, get, missing, number, obj, positive,
    required_string, sse_event, string, unsupported, wrong_type,
};
use crate::error::ApiError;
use crate::openai::{MAX_STOP_BYTES, MAX_STOP_STRINGS, ParseLimits, ParsedRequest};
use crate::routes::{self, Answer, Dialect, Started};
use crate::state::Shared;
use crate::worker::Event;

/// How `/v1/messages` answers and writes its errors.
const DIALECT: Dialect = Dialect {
    answer,
    error: error_response,
};

/// `POST /v1/messages`.
pub(crate) async fn messages(State(s): State<Arc<Shared>>, request: Request) -> Response {
    routes::handle(s, request, parse, DIALECT).await
}

/// Checks the key (`x-api-key`, or `Authorization: Bearer`) when the server has one,
/// answering in Anthropic's error shape.
pub(crate) async fn auth(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if !routes::authorized(&s, request.headers()) {
        let mut e = ApiError::unauthorized();
        e.message =
            "missing or invalid API key: send `x-api-key: <key>` (or `Authorization: Bearer <key>`)"
                .into();
        return error_response(e);
    }
    next.run(request).await
}

/// Anthropic's error `type` for an HTTP status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// The error's body, `{"type": "error", "error": {"type", "message"}}`.
fn error_body(e: &ApiError) -> Value {
    let mut e = e.clone();
    // The chat parser names an image by its OpenAI field.
    if let Some(p) = e.param.as_mut()
        && let Some(block) = p.strip_suffix(".image_url.url")
    {
        *p = format!("{block}.source.data");
    }
    json!({
        "type": "error",
        "error": {"type": error_type(e.status), "message": compat::message_with_param(&e)},
    })
}

/// An error response in Anthropic's shape (with `Retry-After` when it has one).
pub(crate) fn error_response(e: ApiError) -> Response {
    let mut response = (e.status, axum::Json(error_body(&e))).into_response();
    if let Some(s) = e.retry_after_s {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    response
}

/// A request translated into an OpenAI chat body, with what that body cannot say.
#[derive(Debug)]
struct Translated {
    chat: Map<String, Value>,
    top_k: Option<usize>,
    /// The OpenAI path of each message and part, and the Anthropic path it came from.
    paths: Vec<(String, String)>,
}

impl Translated {
    /// `param` (an OpenAI path) as the request named it.
    fn rename(&self, param: &str) -> String {
        compat::rename(&self.paths, param)
    }
}

/// Parses and checks a `/v1/messages` body into the chat route's request.
///
/// # Errors
/// A 400 [`ApiError`] naming the field at fault.
pub(crate) fn parse(body: &[u8], limits: &ParseLimits) -> Result<ParsedRequest, ApiError> {
    let m = compat::object(body)?;
    let t = translate(&m)?;
    let mut req = compat::parse_translated(&t.chat, limits, |p| t.rename(p))?;
    req.sampling.top_k = t.top_k;
    Ok(req)
}

/// The text of `system` (a string, or a list of text blocks).
fn system_text(v: &Value) -> Result<String, ApiError> {
    compat::text_or_parts(
        v,
        "system",
        "text",
        "a system block must be `text`",
        "a string or a list of text blocks",
    )
}

/// A `tool_result` block's content as text (a string, or text blocks).
fn tool_result_text(b: &Map<String, Value>, path: &str) -> Result<String, ApiError> {
    match get(b, "content") {
        None => Ok(String::new()),
        Some(v) => compat::text_or_parts(
            v,
            &format!("{path}.content"),
            "text",
            "a tool result here holds text only",
            "a string or a list of text blocks",
        ),
    }
}

/// An `image` block as an OpenAI `image_url` part (base64 sources only).
fn image_part(b: &Map<String, Value>, path: &str) -> Result<Value, ApiError> {
    let source_path = format!("{path}.source");
    let source = obj(b, "source", path)?.ok_or_else(|| missing(&source_path))?;
    match required_string(source, "type", &source_path)? {
        "base64" => {}
        "url" => {
            return Err(ApiError::invalid(format!(
                "`{source_path}` is a URL; this server fetches no remote images: send the image as a `base64` source"
            ))
            .param(format!("{source_path}.type"))
            .code("invalid_image_url"));
        }
        other => {
            return Err(ApiError::invalid(format!(
                "`{source_path}.type` is `{other}`; only `base64` image sources are accepted"
            ))
            .param(format!("{source_path}.type")));
        }
    }
    let media_type = required_string(source, "media_type", &source_path)?;
    if !media_type.starts_with("image/") {
        return Err(ApiError::invalid(format!(
            "`{source_path}.media_type` is `{media_type}`, not an image/* type"
        ))
        .param(format!("{source_path}.media_type")));
    }
    let data = required_string(source, "data", &source_path)?;
    Ok(json!({
        "type": "image_url",
        "image_url": {"url": format!("data:{media_type};base64,{data}")},
    }))
}

/// Translates one message, pushing its chat messages (a user message with tool
/// results becomes `tool` messages, then the rest).
fn translate_message(
    i: usize,
    v: &Value,
    out: &mut Vec<Value>,
    paths: &mut Vec<(String, String)>,
) -> Result<(), ApiError> {
    let path = format!("messages[{i}]");
    let m = as_obj(v, &path)?;
    let role = required_string(m, "role", &path)?;
    if !matches!(role, "user" | "assistant") {
        return Err(ApiError::invalid(format!(
            "`{path}.role` is `{role}`; it must be `user` or `assistant` (the system prompt goes in `system`)"
        ))
        .param(format!("{path}.role")));
    }
    let content_path = format!("{path}.content");
    let blocks = match get(m, "content") {
        None => return Err(missing(&content_path)),
        Some(Value::String(s)) => {
            paths.push((format!("messages[{}]", out.len()), path));
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        Some(other) => {
            return Err(wrong_type(
                &content_path,
                "a string or a list of content blocks",
                other,
            ));
        }
    };
    let mut parts = Vec::new();
    let mut part_paths = Vec::new();
    let mut tool_calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bpath = format!("{content_path}[{j}]");
        let b = as_obj(b, &bpath)?;
        let kind = required_string(b, "type", &bpath)?;
        match (kind, role) {
            ("text", _) => {
                let text = required_string(b, "text", &bpath)?;
                part_paths.push(bpath);
                parts.push(json!({"type": "text", "text": text}));
            }
            ("image", "user") => {
                parts.push(image_part(b, &bpath)?);
                part_paths.push(bpath);
            }
            ("tool_use", "assistant") => {
                let id = required_string(b, "id", &bpath)?;
                let name = required_string(b, "name", &bpath)?;
                let input = obj(b, "input", &bpath)?.cloned().unwrap_or_default();
                tool_calls.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": Value::Object(input).to_string()},
                }));
            }
            ("tool_result", "user") => {
                let id = required_string(b, "tool_use_id", &bpath)?;
                let mut text = tool_result_text(b, &bpath)?;
                if boolean(b, "is_error", &bpath)? == Some(true) {
                    text.insert_str(0, "Error: ");
                }
                paths.push((format!("messages[{}]", out.len()), bpath));
                out.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
            }
            // A model's reasoning sent back is not part of the prompt.
            ("thinking" | "redacted_thinking", "assistant") => {}
            (other, _) => {
                return Err(ApiError::invalid(format!(
                    "`{bpath}.type` is `{other}`; a {role} message takes {} blocks here",
                    if role == "user" {
                        "`text`, `image` and `tool_result`"
                    } else {
                        "`text`, `tool_use` and `thinking`"
                    }
                ))
                .param(format!("{bpath}.type")));
            }
        }
    }
    if parts.is_empty() && tool_calls.is_empty() && !blocks.is_empty() {
        // Only tool results (already pushed) or only thinking.
        if role == "user" {
            return Ok(());
        }
    }
    let k = out.len();
    for (p, from) in part_paths.into_iter().enumerate() {
        paths.push((format!("messages[{k}].content[{p}]"), from));
    }
    paths.push((format!("messages[{k}]"), path));
    let mut message = json!({"role": role, "content": parts});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    out.push(message);
    Ok(())
}

/// `tools` in OpenAI's form.
fn translate_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let path = format!("tools[{i}]");
        let t = as_obj(t, &path)?;
        if let Some(kind) = string(t, "type", &path)?
            && kind != "custom"
        {
            return Err(unsupported(
                &format!("{path}.type"),
                &format!(
                    "`{kind}` is a server tool; only client tools (name, description, input_schema) run here"
                ),
            ));
        }
        let name = required_string(t, "name", &path)?;
        let schema = obj(t, "input_schema", &path)?
            .ok_or_else(|| missing(&format!("{path}.input_schema")))?;
        let mut function = json!({"name": name, "parameters": schema});
        if let Some(d) = string(t, "description", &path)? {
            function["description"] = json!(d);
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(out)
}

/// `tool_choice` in OpenAI's form, and whether parallel calls are off.
fn translate_tool_choice(c: &Map<String, Value>) -> Result<(Value, bool), ApiError> {
    let serial = boolean(c, "disable_parallel_tool_use", "tool_choice")? == Some(true);
    let choice = match required_string(c, "type", "tool_choice")? {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = required_string(c, "name", "tool_choice")?;
            json!({"type": "function", "function": {"name": name}})
        }
        other => {
            return Err(ApiError::invalid(format!(
                "`tool_choice.type` is `{other}`; it must be `auto`, `any`, `tool` or `none`"
            ))
            .param("tool_choice.type"));
        }
    };
    Ok((choice, serial))
}

/// The OpenAI chat body a Messages request means.
fn translate(m: &Map<String, Value>) -> Result<Translated, ApiError> {
    let mut chat = Map::new();
    let model = required_string(m, "model", "")?;
    chat.insert("model".into(), json!(model));
    let max_tokens = positive(m, "max_tokens", "")?.ok_or_else(|| missing("max_tokens"))?;
    chat.insert("max_tokens".into(), json!(max_tokens));
    let mut messages = Vec::new();
    let mut paths = Vec::new();
    if let Some(system) = get(m, "system") {
        let text = system_text(system)?;
        paths.push(("messages[0]".to_owned(), "system".to_owned()));
        messages.push(json!({"role": "system", "content": text}));
    }
    let wire = array(m, "messages", "")?.ok_or_else(|| missing("messages"))?;
    if wire.is_empty() {
        return Err(
            ApiError::invalid("`messages` is empty: give at least one message").param("messages"),
        );
    }
    for (i, v) in wire.iter().enumerate() {
        translate_message(i, v, &mut messages, &mut paths)?;
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(t) = number(m, "temperature", "")? {
        if !(0.0..=1.0).contains(&t) {
            return Err(
                ApiError::invalid(format!("`temperature` = {t} is outside 0..=1"))
                    .param("temperature"),
            );
        }
        chat.insert("temperature".into(), json!(t));
    }
    if let Some(p) = number(m, "top_p", "")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(
                ApiError::invalid(format!("`top_p` = {p} is outside (0, 1]")).param("top_p"),
            );
        }
        chat.insert("top_p".into(), json!(p));
    }
    let top_k = positive(m, "top_k", "")?.map(|k| usize::try_from(k).unwrap_or(usize::MAX));
    if let Some(stops) = array(m, "stop_sequences", "")? {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(format!(
                "`stop_sequences` has {} strings; at most {MAX_STOP_STRINGS}",
                stops.len()
            ))
            .param("stop_sequences"));
        }
        for (i, s) in stops.iter().enumerate() {
            let field = format!("stop_sequences[{i}]");
            match s.as_str() {
                Some("") => {
                    return Err(ApiError::invalid(format!("`{field}` is empty")).param(field));
                }
                Some(s) if s.len() > MAX_STOP_BYTES => {
                    return Err(ApiError::invalid(format!(
                        "`{field}` has {} bytes; at most {MAX_STOP_BYTES}",
                        s.len()
                    ))
                    .param(field));
                }
                Some(_) => {}
                None => return Err(wrong_type(&field, "a string", s)),
            }
        }
        if !stops.is_empty() {
            chat.insert("stop".into(), Value::Array(stops.clone()));
        }
    }
    if let Some(stream) = boolean(m, "stream", "")? {
        chat.insert("stream".into(), json!(stream));
    }
    // `metadata` (a user id) asks for nothing.
    obj(m, "metadata", "")?;
    if let Some(tools) = array(m, "tools", "")?
        && !tools.is_empty()
    {
        chat.insert("tools".into(), Value::Array(translate_tools(tools)?));
    }
    if let Some(choice) = obj(m, "tool_choice", "")? {
        let (choice, serial) = translate_tool_choice(choice)?;
        if chat.contains_key("tools") || choice != json!("auto") {
            chat.insert("tool_choice".into(), choice);
        }
        if serial && chat.contains_key("tools") {
            chat.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    // Extended thinking: the template is asked to think (or not), and
    // `budget_tokens` caps the thinking block.
    if let Some(thinking) = obj(m, "thinking", "")? {
        match string(thinking, "type", "thinking")? {
            Some("disabled") => {
                chat.insert(
                    "chat_template_kwargs".into(),
                    json!({"enable_thinking": false}),
                );
            }
            Some("enabled") => {
                let budget = number(thinking, "budget_tokens", "thinking")?
                    .filter(|b| b.fract() == 0.0 && *b >= 0.0)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "`thinking.budget_tokens` must be a non-negative integer when thinking is enabled",
                        )
                        .param("thinking.budget_tokens")
                    })?;
                chat.insert(
                    "chat_template_kwargs".into(),
                    json!({"enable_thinking": true}),
                );
                chat.insert("max_reasoning_tokens".into(), json!(budget as u64));
            }
            _ => {
                return Err(
                    ApiError::invalid("`thinking.type` must be `enabled` or `disabled`")
                        .param("thinking.type"),
                );
            }
        }
    }
    if let Some(servers) = array(m, "mcp_servers", "")?
        && !servers.is_empty()
    {
        return Err(unsupported(
            "mcp_servers",
            "this server connects to no MCP servers",
        ));
    }
    Ok(Translated { chat, top_k, paths })
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

/// Anthropic's `stop_reason` and `stop_sequence` for how a run ended: `tool_use`
/// when the model called tools and stopped by itself.
fn stop_reason(
    finish: FinishReason,
    stop: &[String],
    called: bool,
) -> (&'static str, Option<String>) {
    match finish {
        FinishReason::Stop(i) => ("stop_sequence", stop.get(i).cloned()),
        FinishReason::Length => ("max_tokens", None),
        _ if called => ("tool_use", None),
        _ => ("end_turn", None),
    }
}

fn message_id(run: &Started) -> String {
    format!("msg_{}", run.run_id)
}

/// The reader of a run's output into content blocks; tool calls get `toolu_` ids.
fn blocks(run: &mut Started) -> Blocks {
    let prefix = format!("toolu_{}_", run.run_id);
    Blocks::new(run.take_output().with_id_prefix(prefix))
}

/// A `tool_use` content block.
fn tool_use(call: &ToolCall) -> Value {
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments})
}

/// Adds `steps` to a whole message's `content`.
fn add_blocks(content: &mut Vec<Value>, steps: Vec<BlockStep>) {
    for step in steps {
        match step {
            BlockStep::Open(_, TextKind::Text) => content.push(json!({"type": "text", "text": ""})),
            BlockStep::Open(_, TextKind::Reasoning) => {
                content.push(json!({"type": "thinking", "thinking": "", "signature": ""}));
            }
            BlockStep::Delta(_, kind, t) => {
                let field = match kind {
                    TextKind::Text => "text",
                    TextKind::Reasoning => "thinking",
                };
                if let Some(Value::String(s)) = content.last_mut().and_then(|b| b.get_mut(field)) {
                    s.push_str(&t);
                }
            }
            BlockStep::Close(..) => {}
            BlockStep::Call(_, call) => content.push(tool_use(&call)),
        }
    }
}

async fn collect_response(mut run: Started) -> Result<Response, ApiError> {
    let mut blocks = blocks(&mut run);
    let mut content = Vec::new();
    loop {
        match run.rx.recv().await {
            Some(Event::Text(t)) => add_blocks(&mut content, blocks.push(&t)),
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the worker went away")),
            Some(Event::Done(d)) => {
                add_blocks(&mut content, blocks.finish());
                let (reason, sequence) = stop_reason(d.finish, &run.stop, blocks.calls > 0);
                let body = json!({
                    "id": message_id(&run),
                    "type": "message",
                    "role": "assistant",
                    "content": content,
                    "model": run.model,
                    "stop_reason": reason,
                    "stop_sequence": sequence,
                    "usage": {"input_tokens": d.prompt_tokens, "output_tokens": d.completion_tokens},
                });
                return Ok(axum::Json(body).into_response());
            }
            Some(_) => {}
        }
    }
}

/// The stream events of `steps`.
fn block_events(steps: Vec<BlockStep>, queue: &mut VecDeque<String>) {
    let mut event = |name: &str, data: Value| queue.push_back(sse_event(name, &data));
    for step in steps {
        match step {
            BlockStep::Open(i, kind) => {
                let block = match kind {
                    TextKind::Text => json!({"type": "text", "text": ""}),
                    TextKind::Reasoning => {
                        json!({"type": "thinking", "thinking": "", "signature": ""})
                    }
                };
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": block}),
                );
            }
            BlockStep::Delta(i, kind, t) => {
                let delta = match kind {
                    TextKind::Text => json!({"type": "text_delta", "text": t}),
                    TextKind::Reasoning => json!({"type": "thinking_delta", "thinking": t}),
                };
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": delta}),
                );
            }
            BlockStep::Close(i, _) => event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ),
            BlockStep::Call(i, call) => {
                let mut start = tool_use(&call);
                start["input"] = json!({});
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": start}),
                );
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                           "delta": {"type": "input_json_delta", "partial_json": call.arguments_json()}}),
                );
                event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": i}),
                );
            }
        }
    }
}

struct StreamState {
    run: Started,
    blocks: Blocks,
    queue: VecDeque<String>,
    ended: bool,
}

/// The event stream: `message_start`, `ping`, then for each content block (text,
/// thinking, or a `tool_use` whose input comes as one `input_json_delta`)
/// `content_block_start`, its `content_block_delta`s and `content_block_stop`, then
/// `message_delta` (stop reason and usage) and `message_stop`; an `error` event ends
/// a failed run. Dropping the body (the client went away) drops the receiver, which
/// cancels the run.
fn stream_response(mut run: Started) -> Response {
    let mut queue = VecDeque::new();
    queue.push_back(sse_event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": message_id(&run), "type": "message", "role": "assistant", "content": [],
            "model": run.model, "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": run.prompt_tokens, "output_tokens": 0},
        }}),
    ));
    queue.push_back(sse_event("ping", &json!({"type": "ping"})));
    let state = StreamState {
        blocks: blocks(&mut run),
        run,
        queue,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.ended {
                return None;
            }
            match st.run.rx.recv().await {
                Some(Event::Text(t)) => block_events(st.blocks.push(&t), &mut st.queue),
                Some(Event::Done(d)) => {
                    block_events(st.blocks.finish(), &mut st.queue);
                    let (reason, sequence) =
                        stop_reason(d.finish, &st.run.stop, st.blocks.calls > 0);
                    st.queue.push_back(sse_event(
                        "message_delta",
                        &json!({"type": "message_delta",
                                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                "usage": {"output_tokens": d.completion_tokens}}),
                    ));
                    st.queue
                        .push_back(sse_event("message_stop", &json!({"type": "message_stop"})));
                    st.ended = true;
                }
                Some(Event::Failed(e)) => {
                    st.queue.push_back(sse_event("error", &error_body(&e)));
                    st.ended = true;
                }
                None => {
                    let e = ApiError::internal("the worker went away");
                    st.queue.push_back(sse_event("error", &error_body(&e)));
                    st.ended = true;
                }
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
        .unwrap_or_else(|_| error_response(ApiError::internal("building the stream response")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::openai::PromptInput;

    const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

    fn parse_value(v: Value) -> Result<ParsedRequest, ApiError> {
        parse(v.to_string().as_bytes(), &ParseLimits::default())
    }

    #[test]
    fn system_blocks_and_sampling_translate() {
        let r = parse_value(json!({
            "model": "m", "max_tokens": 7,
            "system": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1X1}}]},
            ],
            "stop_sequences": ["\n\n"], "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "stream": true, "metadata": {"user_id": "u"},
        }))
        .unwrap();
        let PromptInput::Chat(m) = &r.prompt else {
            panic!("chat")
        };
        let roles: Vec<_> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(m[0].text, "be\nbrief");
        assert_eq!(m[3].images.len(), 1);
        assert_eq!(m[3].images[0].part, "messages[2].content[1]");
        assert_eq!(r.sampling.max_tokens, Some(7));
        assert_eq!(r.sampling.stop, ["\n\n"]);
        assert_eq!(r.sampling.top_k, Some(5));
        assert_eq!(r.sampling.temperature, Some(0.5));
        assert!(r.stream);
    }

    #[test]
    fn thinking_asks_the_template_and_caps_the_block() {
        let base =
            json!({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "x"}]});
        let mut on = base.clone();
        on["thinking"] = json!({"type": "enabled", "budget_tokens": 12});
        let r = parse_value(on).unwrap();
        assert_eq!(r.chat.enable_thinking, Some(true));
        assert_eq!(r.chat.max_reasoning_tokens, Some(12));
        let mut off = base.clone();
        off["thinking"] = json!({"type": "disabled"});
        let r = parse_value(off).unwrap();
        assert_eq!(r.chat.enable_thinking, Some(false));
        assert_eq!(r.chat.max_reasoning_tokens, None);
        let r = parse_value(base).unwrap();
        assert_eq!(r.chat.enable_thinking, None);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let base = || json!({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]});
        let with = |key: &str, v: Value| {
            let mut b = base();
            b[key] = v;
            b
        };
        let cases = [
            (
                {
                    let mut b = base();
                    b.as_object_mut().unwrap().remove("max_tokens");
                    b
                },
                "max_tokens",
            ),
            (with("messages", json!([])), "messages"),
            (with("temperature", json!(1.5)), "temperature"),
            (with("top_k", json!(0)), "top_k"),
            (
                with("messages", json!([{"role": "system", "content": "x"}])),
                "messages[0].role",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]),
                ),
                "messages[0].content[0].source.type",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "document"}]}]),
                ),
                "messages[0].content[0].type",
            ),
            (
                with("stop_sequences", json!(["a", "b", "c", "d", "e"])),
                "stop_sequences",
            ),
            (with("system", json!(3)), "system"),
            (
                with("thinking", json!({"type": "enabled"})),
                "thinking.budget_tokens",
            ),
            (with("thinking", json!({"type": "always"})), "thinking.type"),
        ];
        for (body, param) in cases {
            let e = parse_value(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body} -> {}", e.message);
        }
        // An image that is not base64 is caught by the chat parser and named as sent.
        let e = parse_value(with(
            "messages",
            json!([{"role": "user", "content": [{"type": "text", "text": "see"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@"}}]}]),
        ))
        .unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[1].image_url.url")
        );
        let body = error_body(&e);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("messages[0].content[1].source.data"),
            "{message}"
        );
    }

    #[test]
    fn tool_blocks_become_tool_calls_and_tool_messages() {
        let t = translate(
            json!({"model": "m", "max_tokens": 4, "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "t1", "name": "get", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {"type": "text", "text": "thanks"}]},
            ],
            "tools": [{"name": "get", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        let m = t.chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(
            m[1]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "t1", "content": "sunny"})
        );
        assert_eq!(m[3]["content"][0]["text"], "thanks");
        assert_eq!(
            t.chat["tools"][0]["function"]["parameters"]["type"],
            "object"
        );
        assert_eq!(t.chat["tool_choice"], "required");
        assert_eq!(t.chat["parallel_tool_calls"], false);
        assert_eq!(t.rename("messages[3].content[0]"), "messages[2].content[1]");
        assert_eq!(t.rename("messages[2]"), "messages[2].content[0]");
    }

    #[test]
    fn stop_reasons() {
        let stop = ["END".to_owned()];
        assert_eq!(
            stop_reason(FinishReason::Eos, &stop, false),
            ("end_turn", None)
        );
        assert_eq!(
            stop_reason(FinishReason::Eos, &stop, true),
            ("tool_use", None)
        );
        assert_eq!(
            stop_reason(FinishReason::Stop(0), &stop, true),
            ("stop_sequence", Some("END".to_owned()))
        );
        assert_eq!(
            stop_reason(FinishReason::Length, &stop, true),
            ("max_tokens", None)
        );
        assert_eq!(
            error_type(StatusCode::TOO_MANY_REQUESTS),
            "rate_limit_error"
        );
        assert_eq!(
            error_type(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error"
        );
    }
}
