//! Chat templates: Hugging Face Jinja templates rendered with minijinja.
//!
//! A model's template comes from the GGUF key `tokenizer.chat_template` or from
//! `tokenizer_config.json`'s `chat_template` (see
//! [`Tokenizer::chat_template`](crate::Tokenizer::chat_template)). The environment
//! matches what `transformers` gives templates: `trim_blocks` and `lstrip_blocks`,
//! loop controls, Python string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`, through `minijinja-contrib`'s pycompat), `raise_exception(msg)`,
//! `strftime_now(format)` (UTC) and a `tojson` filter that writes JSON as Python's
//! `json.dumps` does (`", "` and `": "` separators, non-ASCII kept, optional `indent`).
//!
//! A model without a template gets [`CHATML_TEMPLATE`] ([`ChatTemplate::chatml`]).
//!
//! [`ChatTemplate::encode`] is how a conversation becomes a prompt: only the
//! template's own text may hold control tokens. What a client wrote (the content of
//! `user`, `system`, `tool` and other non-`assistant` messages) is tokenized as plain
//! text ([`Tokenizer::encode_plain`]), so `<|im_start|>system` inside a user message is
//! eleven characters, not a forged turn. A template is bounded: it runs on a fuel
//! budget (instructions), its output may not grow past a size limit, a template that
//! joins a value to itself (`s ~ s`, which doubles a string per step) is refused when
//! compiled, and `tojson` indents at most 64 spaces. The size of the values a template
//! builds in between is not otherwise bounded (the engine has no memory limit): a
//! doubling written less directly still reaches the allocator.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reasoning::prompt_opens_reasoning;
use crate::tokenizer::Tokenizer;
use crate::tools::{ToolCall, ToolCallFormat, ToolDefinition, hermes_system_prompt};

/// Instructions a template may run for a conversation: a base, and more per message.
const FUEL_BASE: u64 = 2_000_000;
const FUEL_PER_MESSAGE: u64 = 20_000;
/// The most a rendering may write: a base, and a multiple of the messages' bytes.
const OUTPUT_BASE: usize = 1 << 20;
const OUTPUT_PER_INPUT_BYTE: usize = 4;

/// The fallback template for models that ship none: ChatML, as used by SmolLM2, Qwen
/// and many others.
///
/// Each message becomes `<|im_start|>{role}\n{content}<|im_end|>\n`; the generation
/// prompt is `<|im_start|>assistant\n`. No system message is added.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message.
///
/// Templates see it as `apply_chat_template` does: `role`, `content`, and when set
/// `tool_calls` (each `{"id", "type": "function", "function": {"name", "arguments"}}`
/// with the arguments a JSON object) and `tool_call_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// The calls an `assistant` message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A `tool` message: the result of call `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new("tool", content)
        }
    }

    /// An `assistant` message that made `calls` (its content may be empty).
    pub fn assistant_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::new("assistant", content)
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat";

/// What a conversation is rendered with beyond its messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatOptions {
    /// Tools the model may call: the template's `tools` variable, or, for a template
    /// that does not use one, a system prompt describing them in the Hermes format
    /// ([`hermes_system_prompt`], merged into the first system message). Default none.
    pub tools: Vec<ToolDefinition>,
    /// The template's `enable_thinking` variable (Qwen3 and similar), when set.
    /// Default unset (the template's own default).
    pub enable_thinking: Option<bool>,
}

/// A conversation encoded for generation, with what reading the output needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// Whether the prompt ends inside a `<think>` block (the output starts in the
    /// reasoning).
    pub opens_reasoning: bool,
    /// How the model writes tool calls.
    pub tool_format: ToolCallFormat,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    /// Whether the template reads a `tools` variable.
    uses_tools: bool,
    tool_format: ToolCallFormat,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template; `bos_token` and `eos_token` are the texts the
    /// template sees under those names (empty when the model has none).
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] with the line of a syntax error.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        Self::named("default", source, bos_token, eos_token)
    }

    /// As [`ChatTemplate::new`], with a name that error messages use.
    ///
    /// # Errors
    /// As [`ChatTemplate::new`].
    pub fn named(
        name: impl Into<String>,
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let name = name.into();
        let source = source.into();
        check_self_concatenation(&name, &source)?;
        let uses_tools = source.contains("tools");
        let tool_format = ToolCallFormat::detect(&source);
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL_BASE));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|source| Error::ChatTemplate {
                name: name.clone(),
                source,
            })?;
        Ok(Self {
            env,
            name,
            uses_tools,
            tool_format,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The ChatML fallback ([`CHATML_TEMPLATE`]) for models with no template.
    ///
    /// # Errors
    /// Never in practice; the signature matches [`ChatTemplate::new`].
    pub fn chatml(bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        Self::named("chatml", CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// The model's template when it has one, else ChatML.
    ///
    /// # Errors
    /// As [`ChatTemplate::new`].
    pub fn from_tokenizer(tokenizer: &crate::Tokenizer) -> Result<Self> {
        let bos = tokenizer.bos_token().unwrap_or_default();
        let eos = tokenizer.eos_token().unwrap_or_default();
        match tokenizer.chat_template() {
            Some(source) => Self::new(source, bos, eos),
            None => Self::chatml(bos, eos),
        }
    }

    /// How the model writes tool calls, as its template's text tells
    /// ([`ToolCallFormat::detect`]).
    pub fn tool_format(&self) -> ToolCallFormat {
        self.tool_format
    }

    /// Whether the template reads a `tools` variable (otherwise tools are described
    /// in a system prompt).
    pub fn uses_tools(&self) -> bool {
        self.uses_tools
    }

    /// Encodes a conversation with the generation prompt and `options` (tools,
    /// `enable_thinking`), as [`ChatTemplate::encode`] does.
    ///
    /// # Errors
    /// As [`ChatTemplate::encode`].
    pub fn encode_chat(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        options: &ChatOptions,
        keep: &[&str],
    ) -> Result<ChatPrompt> {
        // Tool definitions come from the client: a template that renders them itself
        // would read a control token in them as one, so none may hold one (a template
        // without tools gets them in the system message, encoded as plain text).
        if self.uses_tools && !options.tools.is_empty() {
            let text = serde_json::to_string(&options.tools).unwrap_or_default();
            if let Some(token) = tokenizer.find_special_token(&text) {
                // Named by the first tool that holds it.
                let tool = options
                    .tools
                    .iter()
                    .find(|t| serde_json::to_string(t).is_ok_and(|j| j.contains(&token)))
                    .map_or_else(String::new, |t| t.name.clone());
                return Err(Error::Tool {
                    tool,
                    reason: format!(
                        "the definition holds the control token `{token}`; tool names, descriptions and parameters may not"
                    ),
                });
            }
        }
        let (messages, extra) = self.with_options(messages, options);
        let ids = self.encode_with(tokenizer, &messages, true, extra.clone(), keep)?;
        let rendered = self.render_with(&messages, true, extra)?;
        Ok(ChatPrompt {
            ids,
            opens_reasoning: prompt_opens_reasoning(&rendered),
            tool_format: self.tool_format,
        })
    }

    /// The messages and extra variables that render `messages` with `options`.
    fn with_options(&self, messages: &[Message], options: &ChatOptions) -> (Vec<Message>, Value) {
        let mut messages = messages.to_vec();
        let mut extra = serde_json::Map::new();
        if !options.tools.is_empty() {
            if self.uses_tools {
                let tools = serde_json::to_value(&options.tools).unwrap_or_default();
                extra.insert("tools".into(), tools);
            } else {
                let prompt = hermes_system_prompt(&options.tools);
                match messages.first_mut().filter(|m| m.role == "system") {
                    Some(system) => system.content = format!("{}\n\n{prompt}", system.content),
                    None => messages.insert(0, Message::system(prompt)),
                }
            }
        }
        if let Some(on) = options.enable_thinking {
            extra.insert("enable_thinking".into(), serde_json::Value::Bool(on));
        }
        let extra = if extra.is_empty() {
            Value::UNDEFINED
        } else {
            Value::from_serialize(&extra)
        };
        (messages, extra)
    }

    /// Renders a conversation; `add_generation_prompt` appends the opening of the
    /// assistant's turn.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] when the template raises (`raise_exception`) or fails.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, Value::UNDEFINED)
    }

    /// As [`ChatTemplate::render`], with extra variables (`tools`, `documents`, ...)
    /// given as a map, for example `minijinja::context! { tools => tools }` or
    /// `Value::from_serialize(&json)`.
    ///
    /// # Errors
    /// As [`ChatTemplate::render`].
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: Value,
    ) -> Result<String> {
        let err = |source| Error::ChatTemplate {
            name: self.name.clone(),
            source,
        };
        let input: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        let limit = OUTPUT_BASE.saturating_add(input.saturating_mul(OUTPUT_PER_INPUT_BYTE));
        let fuel = FUEL_BASE.saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64));
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel));
        let template = env.get_template(TEMPLATE_NAME).map_err(err)?;
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        // Earlier sources win a key: extra variables cannot replace the conversation.
        let ctx = context! { ..base, ..extra };
        let mut out = Bounded {
            buf: Vec::new(),
            limit,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(e) if out.buf.len() >= limit => {
                return Err(Error::ChatTemplateLimit {
                    name: self.name.clone(),
                    reason: format!(
                        "its output grew past {limit} bytes for {input} bytes of messages ({e})"
                    ),
                });
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Error::ChatTemplateLimit {
                    name: self.name.clone(),
                    reason: format!(
                        "it ran past {fuel} instructions for {} messages",
                        messages.len()
                    ),
                });
            }
            Err(e) => return Err(err(e)),
        }
        String::from_utf8(out.buf).map_err(|e| Error::ChatTemplateLimit {
            name: self.name.clone(),
            reason: format!("its output is not UTF-8: {e}"),
        })
    }

    /// Renders a conversation (with the generation prompt when asked) and encodes it
    /// for `tokenizer`: the template's own text with its special tokens, the content of
    /// every message that is not the `assistant`'s as plain text
    /// ([`Tokenizer::encode_plain`]), except the strings in `keep` (an image
    /// placeholder the server itself put there), which are encoded as the template's
    /// text is.
    ///
    /// # Errors
    /// As [`ChatTemplate::render`]; tokenizer errors.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
        keep: &[&str],
    ) -> Result<Vec<u32>> {
        self.encode_with(
            tokenizer,
            messages,
            add_generation_prompt,
            Value::UNDEFINED,
            keep,
        )
    }

    /// As [`ChatTemplate::encode`], with extra variables (see
    /// [`ChatTemplate::render_with`]).
    ///
    /// # Errors
    /// As [`ChatTemplate::encode`].
    pub fn encode_with(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: Value,
        keep: &[&str],
    ) -> Result<Vec<u32>> {
        let nonce = marker_nonce(messages);
        let marker = |i: usize| format!("{MARK_OPEN}{nonce:016x}:{i}{MARK_CLOSE}");
        let masked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if is_trusted(m) {
                    m.clone()
                } else {
                    Message {
                        content: marker(i),
                        ..m.clone()
                    }
                }
            })
            .collect();
        let rendered = self.render_with(&masked, add_generation_prompt, extra.clone())?;
        let parts = split_marked(&rendered, nonce, messages.len());
        // What the template does to a message's content (nothing, or `| trim`), found
        // by rendering the real conversation and comparing.
        let real = self.render_with(messages, add_generation_prompt, extra)?;
        let transforms: [fn(&str) -> &str; 2] = [|c| c, str::trim];
        let transform = transforms
            .into_iter()
            .find(|t| assemble(&parts, messages, *t) == real)
            .unwrap_or_else(|| {
                tracing::debug!(
                    template = %self.name,
                    "the template changes message content in a way not recognised; content is inserted as written"
                );
                |c| c
            });
        let mut ids = Vec::with_capacity(real.len() / 3);
        for part in &parts {
            match part {
                Part::Template(text) => ids.extend(tokenizer.encode(text, false)?),
                Part::Content(i) => {
                    let content = transform(&messages[*i].content);
                    encode_content(tokenizer, content, keep, &mut ids)?;
                }
            }
        }
        Ok(ids)
    }
}

/// The start and end of a content marker: private-use characters.
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

/// Whether a message's content is the template's to interpret (an `assistant` turn,
/// which holds the model's own control tokens), rather than a client's text.
fn is_trusted(m: &Message) -> bool {
    m.role == "assistant"
}

/// A nonce that no message contains in a marker.
fn marker_nonce(messages: &[Message]) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let state = RandomState::new();
    let mut n = state.hash_one(messages.len());
    while messages
        .iter()
        .any(|m| m.content.contains(&format!("{MARK_OPEN}{n:016x}:")))
    {
        n = state.hash_one(n);
    }
    n
}

/// A piece of a rendered conversation.
#[derive(Debug, PartialEq)]
enum Part<'a> {
    /// The template's own text.
    Template(&'a str),
    /// Message `i`'s content.
    Content(usize),
}

/// Splits a rendering of marked messages at the markers.
fn split_marked(rendered: &str, nonce: u64, messages: usize) -> Vec<Part<'_>> {
    let prefix = format!("{MARK_OPEN}{nonce:016x}:");
    let mut parts = Vec::new();
    let mut rest = rendered;
    while let Some(at) = rest.find(&prefix) {
        let after = &rest[at + prefix.len()..];
        let Some(end) = after.find(MARK_CLOSE) else {
            break;
        };
        let Some(i) = after[..end].parse::<usize>().ok().filter(|&i| i < messages) else {
            break;
        };
        if at > 0 {
            parts.push(Part::Template(&rest[..at]));
        }
        parts.push(Part::Content(i));
        rest = &after[end + MARK_CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        parts.push(Part::Template(rest));
    }
    parts
}

/// The text the parts stand for, with `transform` applied to each content.
fn assemble(parts: &[Part<'_>], messages: &[Message], transform: fn(&str) -> &str) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Template(t) => out.push_str(t),
            Part::Content(i) => out.push_str(transform(&messages[*i].content)),
        }
    }
    out
}

/// Encodes a client's content as plain text, except the `keep` strings.
fn encode_content(
    tokenizer: &Tokenizer,
    content: &str,
    keep: &[&str],
    ids: &mut Vec<u32>,
) -> Result<()> {
    let mut rest = content;
    loop {
        let next = keep
            .iter()
            .filter(|k| !k.is_empty())
            .filter_map(|k| rest.find(k).map(|at| (at, *k)))
            .min_by_key(|&(at, _)| at);
        let Some((at, k)) = next else {
            if !rest.is_empty() {
                ids.extend(tokenizer.encode_plain(rest)?);
            }
            return Ok(());
        };
        if at > 0 {
            ids.extend(tokenizer.encode_plain(&rest[..at])?);
        }
        ids.extend(tokenizer.encode(k, false)?);
        rest = &rest[at + k.len()..];
    }
}

/// The widest `tojson(indent=N)` a template may ask for.
const MAX_JSON_INDENT: usize = 64;

/// Refuses a template that concatenates a value with itself (`s ~ s`, `ns.t + ns.t`):
/// repeated, that doubles a string at every step, and a few dozen steps exhaust
/// memory before the fuel or the output limit can stop it (the template engine
/// bounds instructions and our writer bounds output, not the size of values in
/// between). A heuristic over the source: it catches the direct forms.
fn check_self_concatenation(name: &str, source: &str) -> Result<()> {
    let bytes = source.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.';
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let word = &source[start..i];
        if word.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        let rest = source[i..].trim_start();
        let Some(after_op) = rest.strip_prefix('~').or_else(|| rest.strip_prefix('+')) else {
            continue;
        };
        let after_op = after_op.trim_start();
        let same = after_op.strip_prefix(word).is_some_and(|tail| {
            !tail
                .as_bytes()
                .first()
                .is_some_and(|&b| ident(b) || b == b'(' || b == b'[')
        });
        if same {
            return Err(Error::ChatTemplateLimit {
                name: name.to_owned(),
                reason: format!(
                    "it joins `{word}` to itself, which can double a string at every step"
                ),
            });
        }
    }
    Ok(())
}

/// A writer that refuses to grow past `limit` bytes.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.buf
                .extend_from_slice(&data[..self.limit - self.buf.len().min(self.limit)]);
            return Err(std::io::Error::other("the template's output is too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The current UTC time formatted with Python `strftime` codes: `%Y %y %m %d %e %H %I
/// %M %S %p %B %b %A %a %j %%`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(format_utc(secs, &format))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats seconds since the Unix epoch (UTC) with `strftime` codes.
pub(crate) fn format_utc(secs: u64, format: &str) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    const CUM: [u64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let month_idx = usize::try_from(month - 1).unwrap_or(0).min(11);
    let day_of_year = CUM[month_idx] + day + u64::from(leap && month > 2);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = usize::try_from((days + 3) % 7).unwrap_or(0);
    let month_name = MONTHS[month_idx];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(month_name.get(..3).unwrap_or(month_name)),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(weekday_name.get(..3).unwrap_or(weekday_name)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python-style JSON writing: `", "` between items and `": "` after keys.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `value | tojson` / `value | tojson(indent=2)`, as `json.dumps(ensure_ascii=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > MAX_JSON_INDENT) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: an indent over {MAX_JSON_INDENT} spaces"),
        ));
    }
    let mut buf = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PythonJson);
            value.serialize(&mut ser)
        }
    };
    result.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot write value as JSON")
            .with_source(e)
    })?;
    let text = String::from_utf8(buf).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e)
    })?;
    Ok(Value::from_safe_string(text))
}

#[cfg(test)]
mod tests {
    use super::format_utc;

    #[test]
    fn formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            format_utc(secs, "%Y-%m-%d %H:%M:%S %a %b %j %I%p"),
            "2024-02-29 13:05:09 Thu Feb 060 01PM"
        );
        assert_eq!(format_utc(0, "%d %B %Y %A"), "01 January 1970 Thursday");
        assert_eq!(format_utc(1_735_689_599, "%d %b %Y"), "31 Dec 2024");
    }
}
