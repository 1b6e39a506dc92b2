//! Tool calling: the functions a model may call, and the calls parsed from its output.
//!
//! A request offers [`ToolDefinition`]s (a name, a description, a JSON Schema of the
//! parameters) and says with a [`ToolChoice`] whether the model may, must, or must not
//! call them. The chat template receives the tools as `apply_chat_template` gives
//! them (see [`ChatTemplate::encode_chat`](crate::ChatTemplate::encode_chat)), and
//! the model answers in its own format, which [`ToolCallFormat::detect`] reads off the
//! template's text:
//!
//! | format | the model writes |
//! | --- | --- |
//! | [`ToolCallFormat::Hermes`] (Hermes, Qwen, the default) | `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, one block per call |
//! | [`ToolCallFormat::Llama3Json`] (Llama 3.1+) | `{"name": .., "parameters": {..}}`, possibly after `<\|python_tag\|>`, calls joined by `;` |
//! | [`ToolCallFormat::Mistral`] | `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]` |
//!
//! [`ToolCallParser`] splits the output into content and [`ToolCall`]s, whole
//! ([`ToolCallFormat::parse`]) or as it streams ([`ToolCallParser::push`]): text that
//! might be the start of a call's markup is held back until it is known not to be, so
//! no partial `<tool_call>` reaches the content. Feeding the output in any pieces
//! gives the same content and calls as feeding it whole. A block that does not hold a
//! valid call (malformed JSON, no name, arguments that are not an object) is returned
//! as content, as the model wrote it.

use std::fmt;
use std::str::FromStr;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The longest tool name accepted (OpenAI's limit).
pub const MAX_TOOL_NAME_LEN: usize = 64;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ToolDefinition {
    /// The function's name: ASCII letters, digits, `_`, `-` and `.`, 1 to
    /// [`MAX_TOOL_NAME_LEN`] characters.
    pub name: String,
    /// What the function does, for the model.
    pub description: Option<String>,
    /// A JSON Schema of the arguments: an object schema.
    pub parameters: Value,
}

impl ToolDefinition {
    /// A tool with the given name and parameters schema; `parameters` `null` means
    /// none (`{"type": "object", "properties": {}}`).
    ///
    /// # Errors
    /// [`Error::Tool`] when the name is not a valid function name or the parameters
    /// are not a JSON object.
    pub fn new(
        name: impl Into<String>,
        description: Option<String>,
        parameters: Value,
    ) -> Result<Self> {
        let name = name.into();
        let bad = |reason: String| Error::Tool {
            tool: name.clone(),
            reason,
        };
        if name.is_empty() || name.len() > MAX_TOOL_NAME_LEN {
            return Err(bad(format!(
                "a tool name has 1 to {MAX_TOOL_NAME_LEN} characters, this one {}",
                name.len()
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(bad(format!(
                "a tool name holds ASCII letters, digits, `_`, `-` and `.` only, not {c:?}"
            )));
        }
        let parameters = match parameters {
            Value::Null => serde_json::json!({"type": "object", "properties": {}}),
            Value::Object(o) => Value::Object(o),
            other => {
                return Err(bad(format!(
                    "the parameters must be a JSON Schema object, not `{other}`"
                )));
            }
        };
        Ok(Self {
            name,
            description,
            parameters,
        })
    }
}

/// Templates see a tool as OpenAI sends it:
/// `{"type": "function", "function": {"name", "description", "parameters"}}`.
impl Serialize for ToolDefinition {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut function = Map::new();
        function.insert("name".into(), Value::String(self.name.clone()));
        if let Some(d) = &self.description {
            function.insert("description".into(), Value::String(d.clone()));
        }
        function.insert("parameters".into(), self.parameters.clone());
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("type", "function")?;
        m.serialize_entry("function", &function)?;
        m.end()
    }
}

/// A call the model made (or made earlier, in a conversation's history).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the `tool` message answering it repeats.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments: a JSON object.
    pub arguments: Map<String, Value>,
}

impl ToolCall {
    /// The arguments as JSON text, as OpenAI's `function.arguments` carries them.
    pub fn arguments_json(&self) -> String {
        Value::Object(self.arguments.clone()).to_string()
    }
}

/// Templates see a call as `apply_chat_template` does: `{"id", "type": "function",
/// "function": {"name", "arguments"}}` with the arguments an object (not JSON text).
impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut function = Map::new();
        function.insert("name".into(), Value::String(self.name.clone()));
        function.insert("arguments".into(), Value::Object(self.arguments.clone()));
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("type", "function")?;
        m.serialize_entry("function", &function)?;
        m.end()
    }
}

/// Whether and which tools the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (unconstrained; its output is parsed). The default.
    #[default]
    Auto,
    /// No tools: they are left out of the prompt.
    None,
    /// The model must call at least one tool (constrained).
    Required,
    /// The model must call this function (constrained).
    Function(String),
}

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": .., "arguments": {..}}</tool_call>` (Hermes, Qwen; the
    /// default).
    #[default]
    Hermes,
    /// `{"name": .., "parameters": {..}}`, possibly after `<|python_tag|>` (Llama 3.1+).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": .., "arguments": {..}}]` (Mistral).
    Mistral,
}

impl ToolCallFormat {
    /// The format a chat template's text asks for: Mistral when it writes
    /// `[TOOL_CALLS]`, Llama 3 JSON when it writes `<|python_tag|>` or Llama 3's header
    /// tokens with tools, Hermes otherwise.
    pub fn detect(template: &str) -> Self {
        if template.contains("[TOOL_CALLS]") {
            ToolCallFormat::Mistral
        } else if template.contains("<tool_call>") {
            ToolCallFormat::Hermes
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("tools"))
        {
            ToolCallFormat::Llama3Json
        } else {
            ToolCallFormat::Hermes
        }
    }

    /// Splits a whole output into content and tool calls (ids `call_0`, `call_1`, ..).
    pub fn parse(self, text: &str) -> ParsedOutput {
        let mut parser = ToolCallParser::new(self);
        let mut out = ParsedOutput::default();
        for event in parser.push(text).into_iter().chain(parser.finish()) {
            out.add(event);
        }
        out.finish();
        out
    }

    /// The markup that opens a call.
    fn opener(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "<tool_call>",
            ToolCallFormat::Llama3Json => "<|python_tag|>",
            ToolCallFormat::Mistral => "[TOOL_CALLS]",
        }
    }
}

impl fmt::Display for ToolCallFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ToolCallFormat::Hermes => "hermes",
            ToolCallFormat::Llama3Json => "llama3_json",
            ToolCallFormat::Mistral => "mistral",
        })
    }
}

impl FromStr for ToolCallFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hermes" => Ok(ToolCallFormat::Hermes),
            "llama3_json" => Ok(ToolCallFormat::Llama3Json),
            "mistral" => Ok(ToolCallFormat::Mistral),
            other => Err(Error::Tool {
                tool: String::new(),
                reason: format!(
                    "unknown tool-call format `{other}` (known: hermes, llama3_json, mistral)"
                ),
            }),
        }
    }
}

/// A piece of a model's output, as [`ToolCallParser`] splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Text for the message's content.
    Content(String),
    /// A complete call.
    Call(ToolCall),
}

/// Content and calls of a whole output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedOutput {
    /// The text outside calls (whitespace around calls left out).
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
}

impl ParsedOutput {
    pub(crate) fn add(&mut self, event: ToolEvent) {
        match event {
            ToolEvent::Content(t) => self.content.push_str(&t),
            ToolEvent::Call(c) => self.calls.push(c),
        }
    }

    pub(crate) fn finish(&mut self) {
        if !self.calls.is_empty() && self.content.trim().is_empty() {
            self.content.clear();
        }
    }
}

/// Where the parser is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Outside any call (for Llama 3 JSON: only at the very start of the output).
    Text,
    /// Inside a call's markup, buffering.
    Call,
    /// Llama 3 JSON after content: calls are no longer looked for.
    PlainOnly,
}

/// Splits a streamed output into content and [`ToolCall`]s.
///
/// [`push`](ToolCallParser::push) each text delta and send on the events it returns;
/// [`finish`](ToolCallParser::finish) at the end releases what was held back. The
/// content it returns never holds a partial call opener; whitespace between calls
/// (and after the last) is left out.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    state: State,
    /// Text not yet decided (a possible opener, a call being buffered).
    buf: String,
    /// Whitespace held until non-whitespace content follows it.
    space: String,
    calls: usize,
    id_prefix: String,
}

impl ToolCallParser {
    /// A parser for `format`; calls get the ids `call_0`, `call_1`, ...
    pub fn new(format: ToolCallFormat) -> Self {
        Self {
            format,
            state: State::Text,
            buf: String::new(),
            space: String::new(),
            calls: 0,
            id_prefix: "call_".to_owned(),
        }
    }

    /// Calls get the ids `{prefix}0`, `{prefix}1`, ... instead.
    pub fn with_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.id_prefix = prefix.into();
        self
    }

    /// The format parsed.
    pub fn format(&self) -> ToolCallFormat {
        self.format
    }

    /// How many calls were returned so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next text delta; returns what is now decided.
    pub fn push(&mut self, delta: &str) -> Vec<ToolEvent> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        self.drain(&mut out, false);
        out
    }

    /// Ends the output: a call left open is parsed as it stands (a model may stop
    /// at end-of-sequence before closing it), and held text is released.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.drain(&mut out, true);
        if self.state == State::Call {
            let body = std::mem::take(&mut self.buf);
            match self.parse_calls(&body) {
                Some(calls) => self.emit_calls(calls, &mut out),
                None => {
                    let text = format!("{}{body}", self.opener_written());
                    self.content(&text, &mut out);
                }
            }
            self.state = State::Text;
        }
        let rest = std::mem::take(&mut self.buf);
        self.content(&rest, &mut out);
        if self.calls == 0 && !self.space.is_empty() {
            out.push(ToolEvent::Content(std::mem::take(&mut self.space)));
        }
        merge(out)
    }

    /// What opened the call being buffered, as the model wrote it (for a Llama 3
    /// JSON call without `<|python_tag|>`, nothing).
    fn opener_written(&self) -> &'static str {
        match self.format {
            ToolCallFormat::Llama3Json => "",
            f => f.opener(),
        }
    }

    fn drain(&mut self, out: &mut Vec<ToolEvent>, end: bool) {
        loop {
            match self.state {
                State::PlainOnly => {
                    let text = std::mem::take(&mut self.buf);
                    self.content(&text, out);
                    return;
                }
                State::Text => {
                    if !self.scan_text(out, end) {
                        return;
                    }
                }
                State::Call => {
                    if !self.scan_call(out, end) {
                        return;
                    }
                }
            }
        }
    }

    /// Outside a call: sends content up to an opener and enters the call; returns
    /// whether the state changed.
    fn scan_text(&mut self, out: &mut Vec<ToolEvent>, end: bool) -> bool {
        if self.format == ToolCallFormat::Llama3Json {
            return self.scan_llama_start(end);
        }
        let opener = self.format.opener();
        if let Some(at) = self.buf.find(opener) {
            let before: String = self.buf[..at].to_owned();
            self.content(&before, out);
            self.buf.drain(..at + opener.len());
            self.state = State::Call;
            return true;
        }
        let keep = partial_suffix(&self.buf, opener);
        let cut = self.buf.len() - keep;
        let text: String = self.buf.drain(..cut).collect();
        self.content(&text, out);
        false
    }

    /// Llama 3 JSON: the output is calls when it starts (after whitespace) with
    /// `<|python_tag|>` or `{`; otherwise it is all content.
    fn scan_llama_start(&mut self, end: bool) -> bool {
        let trimmed = self.buf.trim_start();
        let opener = self.format.opener();
        if let Some(rest) = trimmed.strip_prefix(opener) {
            self.buf = rest.to_owned();
            self.state = State::Call;
            return true;
        }
        if trimmed.starts_with('{') {
            self.buf = trimmed.to_owned();
            self.state = State::Call;
            return true;
        }
        if !end && (trimmed.is_empty() || opener.starts_with(trimmed)) {
            return false;
        }
        self.state = State::PlainOnly;
        true
    }

    /// Inside a call: a Hermes block ends at the first `</tool_call>` outside a JSON
    /// string (an argument may hold the tag as text); at the end of the output, with no
    /// such tag, at the first one anywhere. The other formats run to the end of the
    /// output. Returns whether the state changed.
    fn scan_call(&mut self, out: &mut Vec<ToolEvent>, end: bool) -> bool {
        if self.format != ToolCallFormat::Hermes {
            return false;
        }
        const CLOSE: &str = "</tool_call>";
        let found = find_outside_strings(&self.buf, CLOSE);
        let Some(at) = found.or_else(|| end.then(|| self.buf.find(CLOSE)).flatten()) else {
            return false;
        };
        let body: String = self.buf[..at].to_owned();
        self.buf.drain(..at + CLOSE.len());
        match self.parse_calls(&body) {
            Some(calls) => self.emit_calls(calls, out),
            None => {
                let text = format!("<tool_call>{body}{CLOSE}");
                self.content(&text, out);
            }
        }
        self.state = State::Text;
        true
    }

    fn emit_calls(&mut self, calls: Vec<(String, Map<String, Value>)>, out: &mut Vec<ToolEvent>) {
        // Whitespace before a call is layout, not content.
        self.space.clear();
        for (name, arguments) in calls {
            out.push(ToolEvent::Call(ToolCall {
                id: format!("{}{}", self.id_prefix, self.calls),
                name,
                arguments,
            }));
            self.calls += 1;
        }
    }

    /// Sends content, holding trailing whitespace until more content follows.
    fn content(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        if text.is_empty() {
            return;
        }
        let body = text.trim_end();
        if body.is_empty() {
            self.space.push_str(text);
            return;
        }
        let mut piece = std::mem::take(&mut self.space);
        piece.push_str(body);
        self.space.push_str(&text[body.len()..]);
        match out.last_mut() {
            Some(ToolEvent::Content(last)) => last.push_str(&piece),
            _ => out.push(ToolEvent::Content(piece)),
        }
    }

    /// The calls in one block of the format, or `None` when it holds none validly.
    fn parse_calls(&self, body: &str) -> Option<Vec<(String, Map<String, Value>)>> {
        let body = body.trim();
        match self.format {
            ToolCallFormat::Hermes => {
                let v: Value = serde_json::from_str(body).ok()?;
                one_call(v).map(|c| vec![c])
            }
            ToolCallFormat::Mistral => {
                let v: Value = serde_json::from_str(body).ok()?;
                let items = match v {
                    Value::Array(items) => items,
                    obj @ Value::Object(_) => vec![obj],
                    _ => return None,
                };
                let calls: Option<Vec<_>> = items.into_iter().map(one_call).collect();
                calls.filter(|c| !c.is_empty())
            }
            ToolCallFormat::Llama3Json => {
                let mut calls = Vec::new();
                let mut rest = body;
                loop {
                    let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                    let v = it.next()?.ok()?;
                    calls.push(one_call(v)?);
                    rest = rest[it.byte_offset()..].trim_start();
                    rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
                    if rest.is_empty() {
                        return Some(calls);
                    }
                }
            }
        }
    }
}

/// A call object: `name`, and `arguments` or `parameters` (an object, or JSON text
/// of one).
fn one_call(v: Value) -> Option<(String, Map<String, Value>)> {
    let Value::Object(mut o) = v else {
        return None;
    };
    let Some(Value::String(name)) = o.remove("name") else {
        return None;
    };
    let args = o
        .remove("arguments")
        .or_else(|| o.remove("parameters"))
        .unwrap_or_else(|| Value::Object(Map::new()));
    let args = match args {
        Value::Object(m) => m,
        Value::String(s) => match serde_json::from_str(&s).ok()? {
            Value::Object(m) => m,
            _ => return None,
        },
        _ => return None,
    };
    (!name.is_empty()).then_some((name, args))
}

/// The length of the longest suffix of `text` that is a proper prefix of `marker`.
pub(crate) fn partial_suffix(text: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Joins adjacent content events.
fn merge(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::with_capacity(events.len());
    for e in events {
        match (out.last_mut(), e) {
            (Some(ToolEvent::Content(a)), ToolEvent::Content(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

/// The grammar (llguidance's Lark dialect, for
/// [`Constraint::lark`](crate::Constraint::lark)) that makes the model call tools in
/// `format`: for [`ToolChoice::Required`] one of `tools`, for
/// [`ToolChoice::Function`] that one, and with `parallel` one or more calls (one
/// `<tool_call>` block each, for Hermes). Each call is `{"name": <the tool's name>,
/// "arguments": <a value of the tool's parameters schema>}` (`"parameters"` for
/// Llama 3 JSON). `None` for [`ToolChoice::Auto`] and [`ToolChoice::None`], which
/// leave the output free.
///
/// # Errors
/// [`Error::Tool`] when `tools` is empty or names no function that
/// [`ToolChoice::Function`] asks for.
pub fn tool_call_grammar(
    tools: &[ToolDefinition],
    choice: &ToolChoice,
    format: ToolCallFormat,
    parallel: bool,
) -> Result<Option<String>> {
    let chosen: Vec<&ToolDefinition> = match choice {
        ToolChoice::Auto | ToolChoice::None => return Ok(None),
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
    };
    if chosen.is_empty() {
        return Err(Error::Tool {
            tool: match choice {
                ToolChoice::Function(name) => name.clone(),
                _ => String::new(),
            },
            reason: "tool_choice asks for a tool call, but no tool of that name was given"
                .to_owned(),
        });
    }
    let args_key = match format {
        ToolCallFormat::Llama3Json => "parameters",
        _ => "arguments",
    };
    let variants: Vec<Value> = chosen
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    args_key: t.parameters,
                },
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = match <[Value; 1]>::try_from(variants) {
        Ok([one]) => one,
        Err(many) => serde_json::json!({ "anyOf": many }),
    };
    let call = match format {
        ToolCallFormat::Hermes => "\"<tool_call>\\n\" body \"\\n</tool_call>\"",
        ToolCallFormat::Llama3Json | ToolCallFormat::Mistral => "body",
    };
    let start = match (format, parallel) {
        (ToolCallFormat::Hermes, true) => "call (\"\\n\" call)*",
        (ToolCallFormat::Llama3Json, true) => "call (\"; \" call)*",
        (ToolCallFormat::Mistral, true) => "\"[TOOL_CALLS][\" call (\", \" call)* \"]\"",
        (ToolCallFormat::Mistral, false) => "\"[TOOL_CALLS][\" call \"]\"",
        (_, false) => "call",
    };
    Ok(Some(format!(
        "start: {start}\ncall: {call}\nbody: %json {schema}\n"
    )))
}

/// The system prompt that describes `tools` to a model whose template does not take
/// them, asking for Hermes-format calls (as llama.cpp does for generic templates).
pub fn hermes_system_prompt(tools: &[ToolDefinition]) -> String {
    let mut s = String::from(
        "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about what values to plug into functions. Here are the available tools: <tools>",
    );
    for t in tools {
        s.push('\n');
        s.push_str(&serde_json::to_string(t).unwrap_or_default());
    }
    s.push_str(
        "\n</tools>\nFor each function call, return a JSON object with the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// Where `pat` first occurs in `s` outside JSON strings (`"` to an unescaped `"`).
fn find_outside_strings(s: &str, pat: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    for (i, &c) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else if bytes[i..].starts_with(pat.as_bytes()) {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    /// Feeds `text` split at every character boundary into two pieces, and in
    /// one-character pieces, and checks each gives what the whole parse gives.
    fn same_in_pieces(format: ToolCallFormat, text: &str) -> ParsedOutput {
        let whole = format.parse(text);
        let run = |pieces: Vec<&str>| {
            let mut p = ToolCallParser::new(format);
            let mut out = ParsedOutput::default();
            for piece in pieces {
                for e in p.push(piece) {
                    out.add(e);
                }
                // Content sent is never taken back: no partial markup leaks.
                assert!(
                    whole.content.starts_with(&out.content),
                    "content {:?} is not a prefix of {:?}",
                    out.content,
                    whole.content
                );
            }
            for e in p.finish() {
                out.add(e);
            }
            out.finish();
            out
        };
        for (i, _) in text.char_indices().chain([(text.len(), ' ')]) {
            assert_eq!(
                run(vec![&text[..i], &text[i..]]),
                whole,
                "split at byte {i} of {text:?}"
            );
        }
        let chars: Vec<&str> = text
            .char_indices()
            .map(|(i, c)| &text[i..i + c.len_utf8()])
            .collect();
        assert_eq!(run(chars), whole, "one character at a time: {text:?}");
        whole
    }

    #[test]
    fn hermes_calls_and_content() {
        let text = "Let me check. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>\n";
        let out = same_in_pieces(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, "Let me check.");
        assert_eq!(out.calls.len(), 2);
        assert_eq!(out.calls[0].name, "get_weather");
        assert_eq!(out.calls[0].arguments, args(json!({"city": "Paris"})));
        assert_eq!(out.calls[0].id, "call_0");
        assert_eq!(out.calls[1].name, "now");
        assert_eq!(out.calls[1].id, "call_1");
    }

    /// A closing tag inside an argument's string (a sampled model wrote one) is text:
    /// the block ends at the tag after the JSON, however the output is cut.
    #[test]
    fn hermes_closing_tag_inside_a_string_is_an_argument() {
        let text = "<tool_call>\n{\"name\": \"get_time\",\"arguments\":{\"zone\":\"Jal \\\"x\\\" }}</tool_call>\"\n\n}\n\n}\n</tool_call>";
        let out = same_in_pieces(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, "");
        assert_eq!(out.calls.len(), 1, "{out:?}");
        assert_eq!(out.calls[0].name, "get_time");
        assert_eq!(
            out.calls[0].arguments,
            args(json!({"zone": "Jal \"x\" }}</tool_call>"}))
        );
        // A block that never closes outside a string still ends at the tag at the end.
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {}} \"</tool_call> after";
        let out = same_in_pieces(ToolCallFormat::Hermes, text);
        assert!(out.calls.is_empty(), "{out:?}");
        assert!(out.content.contains("after"), "{out:?}");
    }

    #[test]
    fn hermes_unclosed_call_at_the_end_and_string_arguments() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}";
        let out = same_in_pieces(ToolCallFormat::Hermes, text);
        assert_eq!(out.content, "");
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].arguments, args(json!({"x": 1})));
    }

    #[test]
    fn hermes_malformed_block_stays_content() {
        let text = "a <tool_call>{\"name\": 3}</tool_call> b <tool_ca";
        let out = same_in_pieces(ToolCallFormat::Hermes, text);
        assert!(out.calls.is_empty());
        assert_eq!(out.content, text);
        let plain = same_in_pieces(ToolCallFormat::Hermes, "no calls, just text é ");
        assert_eq!(plain.content, "no calls, just text é ");
    }

    #[test]
    fn llama3_json_calls() {
        let text = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"rust\"}}; {\"name\": \"now\", \"parameters\": {}}";
        let out = same_in_pieces(ToolCallFormat::Llama3Json, text);
        assert_eq!(out.content, "");
        assert_eq!(out.calls.len(), 2);
        assert_eq!(out.calls[0].arguments, args(json!({"q": "rust"})));
        let bare = same_in_pieces(
            ToolCallFormat::Llama3Json,
            " {\"name\": \"now\", \"parameters\": {\"tz\": \"UTC\"}}",
        );
        assert_eq!(bare.calls.len(), 1);
        assert_eq!(bare.calls[0].name, "now");
        let prose = same_in_pieces(ToolCallFormat::Llama3Json, "The answer is {not a call}.");
        assert!(prose.calls.is_empty());
        assert_eq!(prose.content, "The answer is {not a call}.");
        let bad = same_in_pieces(ToolCallFormat::Llama3Json, "{\"oops\": 1}");
        assert!(bad.calls.is_empty());
        assert_eq!(bad.content, "{\"oops\": 1}");
    }

    #[test]
    fn mistral_calls() {
        let text = "Sure.[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"n\": [1, 2]}}, {\"name\": \"b\", \"arguments\": {}}]";
        let out = same_in_pieces(ToolCallFormat::Mistral, text);
        assert_eq!(out.content, "Sure.");
        assert_eq!(out.calls.len(), 2);
        assert_eq!(out.calls[0].arguments, args(json!({"n": [1, 2]})));
        assert_eq!(out.calls[1].name, "b");
    }

    #[test]
    fn detects_formats_from_templates() {
        assert_eq!(
            ToolCallFormat::detect("{{ '[TOOL_CALLS]' }}{{ tools }}"),
            ToolCallFormat::Mistral
        );
        assert_eq!(
            ToolCallFormat::detect("<|start_header_id|>{% if tools %}<|python_tag|>"),
            ToolCallFormat::Llama3Json
        );
        assert_eq!(
            ToolCallFormat::detect("{% if tools %}<tool_call>{% endif %}<|im_start|>"),
            ToolCallFormat::Hermes
        );
        assert_eq!(
            ToolCallFormat::detect("<|im_start|>"),
            ToolCallFormat::Hermes
        );
        for f in [
            ToolCallFormat::Hermes,
            ToolCallFormat::Llama3Json,
            ToolCallFormat::Mistral,
        ] {
            assert_eq!(f.to_string().parse::<ToolCallFormat>().ok(), Some(f));
        }
    }

    #[test]
    fn definitions_are_checked_and_serialize_as_openai() {
        assert!(ToolDefinition::new("bad name", None, Value::Null).is_err());
        assert!(ToolDefinition::new("", None, Value::Null).is_err());
        assert!(ToolDefinition::new("f", None, json!([1])).is_err());
        let t = ToolDefinition::new("f", Some("does f".into()), Value::Null).ok();
        let v = serde_json::to_value(t).ok();
        assert_eq!(
            v,
            Some(
                json!({"type": "function", "function": {"name": "f", "description": "does f",
                "parameters": {"type": "object", "properties": {}}}})
            )
        );
        let call = ToolCall {
            id: "c1".into(),
            name: "f".into(),
            arguments: args(json!({"x": 1})),
        };
        assert_eq!(
            serde_json::to_value(&call).ok(),
            Some(
                json!({"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}})
            )
        );
        assert_eq!(call.arguments_json(), "{\"x\":1}");
    }
}
