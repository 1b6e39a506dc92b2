//! What the translated APIs (Anthropic's Messages, OpenAI's Responses) share: reading
//! a request body as JSON with errors that name the field, and server-sent events
//! with an `event:` line.
//!
//! Both APIs are translated into an OpenAI chat request, parsed by
//! [`parse_chat`](crate::openai::parse_chat) and run on the chat path; only their
//! wire formats live in their own modules.

use afo_runtime::engine::{ChatEvent, ChatOutputParser, ToolCall};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// What kind of text an output block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextKind {
    /// The model's reasoning (a `<think>` block).
    Reasoning,
    /// The answer.
    Text,
}

/// One step of a model's output as a sequence of numbered blocks: Anthropic's
/// content blocks and the Responses API's output items both have this shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BlockStep {
    /// Block `index` of text of this kind begins.
    Open(usize, TextKind),
    /// More text for the open block `index`.
    Delta(usize, TextKind, String),
    /// Block `index` ends.
    Close(usize, TextKind),
    /// Block `index` is a whole tool call (it opens and closes at once).
    Call(usize, ToolCall),
}

/// Turns a run's text, delta by delta, into [`BlockStep`]s: reasoning and answer
/// text in blocks of their own, a new block whenever the kind changes, each tool call
/// a block.
#[derive(Debug)]
pub(crate) struct Blocks {
    parser: ChatOutputParser,
    open: Option<(usize, TextKind)>,
    next: usize,
    /// Tool calls seen.
    pub calls: usize,
}

impl Blocks {
    pub(crate) fn new(parser: ChatOutputParser) -> Self {
        Self {
            parser,
            open: None,
            next: 0,
            calls: 0,
        }
    }

    /// The steps `delta` decides.
    pub(crate) fn push(&mut self, delta: &str) -> Vec<BlockStep> {
        let events = self.parser.push(delta);
        self.route(events)
    }

    /// The steps left at the end of the output; the open block is closed.
    pub(crate) fn finish(&mut self) -> Vec<BlockStep> {
        let events = self.parser.finish();
        let mut steps = self.route(events);
        if let Some((i, kind)) = self.open.take() {
            steps.push(BlockStep::Close(i, kind));
        }
        steps
    }

    fn text(&mut self, kind: TextKind, text: String, steps: &mut Vec<BlockStep>) {
        if text.is_empty() {
            return;
        }
        let index = match self.open {
            Some((i, k)) if k == kind => i,
            open => {
                if let Some((i, k)) = open {
                    steps.push(BlockStep::Close(i, k));
                }
                let i = self.next;
                self.next += 1;
                self.open = Some((i, kind));
                steps.push(BlockStep::Open(i, kind));
                i
            }
        };
        steps.push(BlockStep::Delta(index, kind, text));
    }

    fn route(&mut self, events: Vec<ChatEvent>) -> Vec<BlockStep> {
        let mut steps = Vec::new();
        for event in events {
            match event {
                ChatEvent::Reasoning(t) => self.text(TextKind::Reasoning, t, &mut steps),
                ChatEvent::Content(t) => self.text(TextKind::Text, t, &mut steps),
                ChatEvent::ToolCall(call) => {
                    if let Some((i, k)) = self.open.take() {
                        steps.push(BlockStep::Close(i, k));
                    }
                    steps.push(BlockStep::Call(self.next, call));
                    self.next += 1;
                    self.calls += 1;
                }
            }
        }
        steps
    }
}

/// `param` (a path in the translated chat body, `messages[2].content[1]...`) as the
/// request named it: the longest prefix in `paths` (chat path, the request's path)
/// replaced by the request's path.
pub(crate) fn rename(paths: &[(String, String)], param: &str) -> String {
    let best = paths
        .iter()
        .filter(|(from, _)| {
            param
                .strip_prefix(from.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        .max_by_key(|(from, _)| from.len());
    match best {
        Some((from, to)) => format!("{to}{}", &param[from.len()..]),
        None => param.to_owned(),
    }
}

/// Parses a translated chat body with the chat route's parser; the fields its errors
/// and images name are renamed by `rename` to the request's own paths.
pub(crate) fn parse_translated(
    chat: &Map<String, Value>,
    limits: &crate::openai::ParseLimits,
    rename: impl Fn(&str) -> String,
) -> Result<crate::openai::ParsedRequest, ApiError> {
    let bytes = serde_json::to_vec(chat)
        .map_err(|e| ApiError::internal(format!("writing the chat request: {e}")))?;
    let mut req = crate::openai::parse_chat(&bytes, limits).map_err(|mut e| {
        if let Some(p) = &e.param {
            e.param = Some(rename(p));
        }
        e
    })?;
    if let crate::openai::PromptInput::Chat(messages) = &mut req.prompt {
        for image in messages.iter_mut().flat_map(|m| m.images.iter_mut()) {
            image.part = rename(&image.part);
        }
    }
    Ok(req)
}

/// The text of the field at `path`: a string, or a list of parts `{"type": kind,
/// "text"}` joined by newlines. A part of another type is a 400 whose message ends
/// with `rule`; any other value one that says the field must be `want`.
pub(crate) fn text_or_parts(
    v: &Value,
    path: &str,
    kind: &str,
    rule: &str,
    want: &str,
) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                let ppath = format!("{path}[{i}]");
                let p = as_obj(p, &ppath)?;
                match required_string(p, "type", &ppath)? {
                    t if t == kind => text.push(required_string(p, "text", &ppath)?),
                    other => {
                        return Err(ApiError::invalid(format!(
                            "`{ppath}.type` is `{other}`; {rule}"
                        ))
                        .param(format!("{ppath}.type")));
                    }
                }
            }
            Ok(text.join("\n"))
        }
        other => Err(wrong_type(path, want, other)),
    }
}

/// The JSON type of `v`, for error messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A 400 naming `field`: it should be `want`, and is `got`.
pub(crate) fn wrong_type(field: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(format!("`{field}` must be {want}, not {}", type_name(got))).param(field)
}

/// Parses a body as a JSON object.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::invalid(format!(
            "the request body must be a JSON object, not {}",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::invalid(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Field `key` of `m` (at `path`, for errors), absent when missing or null.
pub(crate) fn get<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

/// A string field, when present.
pub(crate) fn string<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, ApiError> {
    match get(m, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(&join(path, key), "a string", other)),
    }
}

/// A string field that must be there.
pub(crate) fn required_string<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, ApiError> {
    string(m, key, path)?.ok_or_else(|| missing(&join(path, key)))
}

/// A boolean field, when present.
pub(crate) fn boolean(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<bool>, ApiError> {
    match get(m, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(&join(path, key), "a boolean", other)),
    }
}

/// A number field, when present.
pub(crate) fn number(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<f64>, ApiError> {
    match get(m, key) {
        None => Ok(None),
        Some(v @ Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| wrong_type(&join(path, key), "a number", v)),
        Some(other) => Err(wrong_type(&join(path, key), "a number", other)),
    }
}

/// A positive integer field, when present.
pub(crate) fn positive(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<u64>, ApiError> {
    let field = join(path, key);
    match get(m, key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(0) => Err(ApiError::invalid(format!("`{field}` must be at least 1")).param(field)),
            Some(n) => Ok(Some(n)),
            None => Err(wrong_type(&field, "a positive integer", v)),
        },
    }
}

/// An object field, when present.
pub(crate) fn obj<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match get(m, key) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(wrong_type(&join(path, key), "an object", other)),
    }
}

/// An array field, when present.
pub(crate) fn array<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Vec<Value>>, ApiError> {
    match get(m, key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err(wrong_type(&join(path, key), "an array", other)),
    }
}

/// `v` as an object (at `path`).
pub(crate) fn as_obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| wrong_type(path, "an object", v))
}

/// A 400: `field` is required.
pub(crate) fn missing(field: &str) -> ApiError {
    ApiError::invalid(format!("`{field}` is required")).param(field)
}

/// A 400: `field` asks for what this server does not do.
pub(crate) fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::invalid(format!("`{field}` is not supported by this server: {why}"))
        .param(field)
        .code("unsupported_parameter")
}

/// `path.key`, or `key` at the top.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// One server-sent event with its name: `event: NAME` and `data: JSON`.
pub(crate) fn sse_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// The text of a request's error, with the field at fault when the message does
/// not already name it (the APIs whose error bodies have no `param`).
pub(crate) fn message_with_param(e: &ApiError) -> String {
    match &e.param {
        Some(p) if !e.message.contains(p.as_str()) => format!("{} (field `{p}`)", e.message),
        _ => e.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blocks_split_reasoning_text_and_calls_whatever_the_deltas() {
        let output = "plan it</think>Sure.<tool_call>{\"name\": \"get\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
        let whole = {
            let mut b = Blocks::new(ChatOutputParser::new(
                true,
                Some(afo_runtime::engine::ToolCallFormat::Hermes),
            ));
            let mut steps = b.push(output);
            steps.extend(b.finish());
            steps
        };
        // Merged per block, the same whether the text came whole or a byte at a time.
        let merge = |steps: Vec<BlockStep>| {
            let mut out: Vec<(usize, String)> = Vec::new();
            for step in steps {
                match step {
                    BlockStep::Open(i, k) => out.push((i, format!("{k:?}:"))),
                    BlockStep::Delta(i, _, t) => {
                        assert_eq!(out.last().map(|o| o.0), Some(i));
                        if let Some(last) = out.last_mut() {
                            last.1.push_str(&t);
                        }
                    }
                    BlockStep::Close(i, _) => assert_eq!(out.last().map(|o| o.0), Some(i)),
                    BlockStep::Call(i, c) => {
                        out.push((i, format!("{}({})", c.name, c.arguments_json())))
                    }
                }
            }
            out
        };
        let want = vec![
            (0, "Reasoning:plan it".to_owned()),
            (1, "Text:Sure.".to_owned()),
            (2, "get({\"city\":\"Paris\"})".to_owned()),
        ];
        assert_eq!(merge(whole), want);
        let mut b = Blocks::new(ChatOutputParser::new(
            true,
            Some(afo_runtime::engine::ToolCallFormat::Hermes),
        ));
        let mut steps = Vec::new();
        for ch in output.chars() {
            steps.extend(b.push(&ch.to_string()));
        }
        steps.extend(b.finish());
        assert_eq!(merge(steps), want);
        assert_eq!(b.calls, 1);
    }

    #[test]
    fn fields_are_named_in_errors() {
        let m = object(br#"{"a": 1, "b": "x", "c": null, "d": 0}"#).unwrap();
        assert_eq!(string(&m, "b", "").unwrap(), Some("x"));
        assert_eq!(string(&m, "c", "").unwrap(), None);
        let e = string(&m, "a", "top").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top.a"));
        assert!(
            e.message.contains("must be a string, not a number"),
            "{}",
            e.message
        );
        assert_eq!(
            positive(&m, "d", "").unwrap_err().param.as_deref(),
            Some("d")
        );
        assert_eq!(
            required_string(&m, "z", "").unwrap_err().param.as_deref(),
            Some("z")
        );
        assert!(object(b"[1]").unwrap_err().message.contains("an array"));
        assert!(object(b"").is_err());
    }

    #[test]
    fn events_carry_their_name() {
        assert_eq!(
            sse_event("ping", &serde_json::json!({"type": "ping"})),
            "event: ping\ndata: {\"type\":\"ping\"}\n\n"
        );
    }
}
