//! The OpenAI wire format: request bodies, their checks, and response objects.
//!
//! Requests are parsed from raw bytes (never trusted): malformed JSON, wrong types,
//! empty message lists, unknown content parts and bad `image_url` data URLs become
//! an [`ApiError`] naming the field. Fields that ask for nothing (`user`,
//! `logprobs: false`, `tools: []`, ...) are accepted and ignored, as OpenAI clients
//! send them; fields that ask for what the server does not do (`functions`, `echo`,
//! `suffix`, `best_of` > 1) are refused with a 400 naming them. Every
//! client-controlled size has a limit ([`MAX_STOP_STRINGS`], [`MAX_STOP_BYTES`],
//! [`MAX_MESSAGES`], [`MAX_MODEL_NAME_BYTES`], [`ParseLimits`]).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
pub use crate::tools::ChatControls;

/// The most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// The most bytes one stop string may have.
pub const MAX_STOP_BYTES: usize = 256;
/// The most messages one chat request may hold.
pub const MAX_MESSAGES: usize = 2048;
/// The most bytes a `model` name may have.
pub const MAX_MODEL_NAME_BYTES: usize = 256;
/// The most choices (`n`) one request may ask for: each is a sequence of its own,
/// admitted on the ledger like a request.
pub const MAX_CHOICES: usize = 8;
/// The most `logit_bias` entries one request may give (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A chat message's content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
struct ImageUrl {
    url: String,
}

#[derive(Debug, Clone, Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
struct WireSampling {
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Fields this server does not implement yet: refused with a 400 when they ask
    /// for something (rather than silently ignored).
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    top_logprobs: Option<serde_json::Value>,
    #[serde(default)]
    tools: Option<serde_json::Value>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    functions: Option<serde_json::Value>,
    #[serde(default)]
    function_call: Option<serde_json::Value>,
    #[serde(default)]
    response_format: Option<serde_json::Value>,
    #[serde(default)]
    logit_bias: Option<serde_json::Value>,
    #[serde(default)]
    echo: Option<serde_json::Value>,
    #[serde(default)]
    best_of: Option<serde_json::Value>,
    #[serde(default)]
    suffix: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct WireChat {
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    parallel_tool_calls: Option<serde_json::Value>,
    #[serde(default)]
    reasoning_effort: Option<serde_json::Value>,
    #[serde(default)]
    chat_template_kwargs: Option<serde_json::Value>,
    #[serde(default)]
    max_reasoning_tokens: Option<serde_json::Value>,
    #[serde(flatten)]
    sampling: WireSampling,
}

/// The largest `max_reasoning_tokens` accepted.
pub const MAX_REASONING_TOKENS: u64 = 1 << 20;

/// `max_reasoning_tokens` (an extension): the most tokens the model's `<think>`
/// block may take before it is closed.
fn check_reasoning_budget(v: Option<serde_json::Value>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= MAX_REASONING_TOKENS)
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "`max_reasoning_tokens` is {v}; give an integer in 0..={MAX_REASONING_TOKENS}"
                ))
                .param("max_reasoning_tokens")
            }),
    }
}

/// `prompt` of `/v1/completions`: a string or a list of one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum WirePrompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
struct WireCompletion {
    model: String,
    prompt: WirePrompt,
    #[serde(flatten)]
    sampling: WireSampling,
}

/// An image attached to a chat message, decoded from a `data:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInput {
    /// The media type of the URL (`image/png`, ...).
    pub media_type: String,
    /// The image file's bytes.
    pub bytes: Vec<u8>,
    /// Where the request held it (`messages[0].content[1]`; empty outside a
    /// request), for error messages.
    pub part: String,
}

/// One chat message after the checks.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool` (`developer` becomes `system`).
    pub role: String,
    /// The text parts joined.
    pub text: String,
    /// Images, in order.
    pub images: Vec<ImageInput>,
    /// Where each image stood among the parts: the byte offset into `text` at which
    /// image `k` goes (a vision-language prompt puts the image there).
    pub image_offsets: Vec<usize>,
    /// The calls an `assistant` message made.
    pub tool_calls: Vec<afo_runtime::engine::ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// A conversation (`/v1/chat/completions`).
    Chat(Vec<ChatMessage>),
    /// Plain text (`/v1/completions`).
    Text(String),
}

impl PromptInput {
    /// Every image of the prompt.
    pub fn images(&self) -> impl Iterator<Item = &ImageInput> {
        let messages: &[ChatMessage] = match self {
            PromptInput::Chat(m) => m,
            PromptInput::Text(_) => &[],
        };
        messages.iter().flat_map(|m| m.images.iter())
    }

    /// The text the selector routes on: the last user message, or the prompt.
    pub fn routing_text(&self) -> &str {
        match self {
            PromptInput::Text(t) => t,
            PromptInput::Chat(m) => m
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or(m.last())
                .map_or("", |m| m.text.as_str()),
        }
    }
}

/// Sampling and limits of a request after the checks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    /// `max_tokens` (or `max_completion_tokens`), when given.
    pub max_tokens: Option<usize>,
    /// Temperature, 0 to 2 (OpenAI's default, 1, when absent).
    pub temperature: Option<f32>,
    /// Nucleus mass, in (0, 1].
    pub top_p: Option<f32>,
    /// Sample among the `k` most likely tokens only (Anthropic's `top_k`; not an
    /// OpenAI field).
    pub top_k: Option<usize>,
    /// Seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Presence penalty, -2 to 2.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// `logit_bias`: (token id, bias in -100..=100), sorted by id. The ids are
    /// checked against the model's vocabulary once the model is known.
    pub logit_bias: Vec<(u32, f32)>,
    /// Log-probabilities asked for, with the number of alternatives per token (chat:
    /// `logprobs: true` and `top_logprobs`; completions: `logprobs: k`).
    pub logprobs: Option<usize>,
    /// `n`: how many choices to generate (1 when absent; 0 reads as 1).
    pub n: usize,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Endpoint {
    /// The OpenTelemetry `gen_ai.operation.name`.
    pub const fn operation(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "text_completion",
        }
    }
}

/// A request to either endpoint, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The model asked for (`auto` routes through the selector).
    pub model: String,
    /// The prompt.
    pub prompt: PromptInput,
    /// Sampling and limits.
    pub sampling: Sampling,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Tools and thinking (chat only).
    pub chat: crate::tools::ChatControls,
}

/// Limits the parser enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// The most bytes one decoded image may have.
    pub max_image_bytes: usize,
    /// The most images one request may carry.
    pub max_images: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_image_bytes: 8 << 20,
            max_images: 8,
        }
    }
}

fn json_error(e: &serde_json::Error) -> ApiError {
    let what = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            "the request body is not valid JSON"
        }
        serde_json::error::Category::Io => "the request body could not be read",
        serde_json::error::Category::Data => "the request body does not match the schema",
    };
    ApiError::invalid(format!("{what}: {e}"))
}

pub(crate) fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

/// Parses and checks a `/v1/chat/completions` body.
///
/// # Errors
/// An [`ApiError`] (400) naming what is wrong.
pub fn parse_chat(body: &[u8], limits: &ParseLimits) -> Result<ParsedRequest, ApiError> {
    let mut wire: WireChat = parse_json(body)?;
    let chat = crate::tools::parse_controls(
        wire.sampling.tools.take(),
        wire.sampling.tool_choice.take(),
        wire.parallel_tool_calls.take(),
        wire.reasoning_effort.take(),
        wire.chat_template_kwargs.take(),
    )?;
    let chat = ChatControls {
        format: check_response_format(wire.sampling.response_format.take())?,
        max_reasoning_tokens: check_reasoning_budget(wire.max_reasoning_tokens.take())?,
        ..chat
    };
    check_model_name(&wire.model)?;
    if wire.messages.is_empty() {
        return Err(
            ApiError::invalid("`messages` is empty: give at least one message").param("messages"),
        );
    }
    if wire.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(format!(
            "`messages` has {} messages; at most {MAX_MESSAGES}",
            wire.messages.len()
        ))
        .param("messages"));
    }
    let mut images = 0usize;
    let mut messages = Vec::with_capacity(wire.messages.len());
    for (i, m) in wire.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].role `{other}` is not one of system, developer, user, assistant, tool"
                ))
                .param(format!("messages[{i}].role")));
            }
        };
        let mut message = ChatMessage {
            role: role.to_owned(),
            text: String::new(),
            images: Vec::new(),
            image_offsets: Vec::new(),
            tool_calls: match m.tool_calls {
                Some(calls) if role == "assistant" => {
                    crate::tools::parse_history_calls(calls, &format!("messages[{i}]"))?
                }
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}].tool_calls: only `assistant` messages carry tool calls"
                    ))
                    .param(format!("messages[{i}].tool_calls")));
                }
            },
            tool_call_id: m.tool_call_id,
        };
        match m.content {
            None => {}
            Some(Content::Text(t)) => message.text = t,
            Some(Content::Parts(parts)) => {
                for (j, part) in parts.into_iter().enumerate() {
                    let param = || format!("messages[{i}].content[{j}]");
                    match part {
                        Part::Text { text } => {
                            if !message.text.is_empty() {
                                message.text.push('\n');
                            }
                            message.text.push_str(&text);
                        }
                        Part::ImageUrl { image_url } => {
                            images += 1;
                            if images > limits.max_images {
                                return Err(ApiError::invalid(format!(
                                    "more than {} images in one request",
                                    limits.max_images
                                ))
                                .param(param()));
                            }
                            let mut image = decode_data_url(&image_url.url, limits.max_image_bytes)
                                .map_err(|e| e.param(format!("{}.image_url.url", param())))?;
                            image.part = param();
                            message.image_offsets.push(message.text.len());
                            message.images.push(image);
                        }
                        Part::Unsupported => {
                            return Err(ApiError::invalid(format!(
                                "messages[{i}].content[{j}] has a part type this server does not accept (only `text` and `image_url`)"
                            ))
                            .param(format!("{}.type", param())));
                        }
                    }
                }
            }
        }
        messages.push(message);
    }
    let (sampling, stream, include_usage) = check_sampling(wire.sampling, Endpoint::Chat)?;
    Ok(ParsedRequest {
        endpoint: Endpoint::Chat,
        model: wire.model,
        prompt: PromptInput::Chat(messages),
        sampling,
        stream,
        include_usage,
        chat,
    })
}

/// Parses and checks a `/v1/completions` body.
///
/// # Errors
/// An [`ApiError`] (400) naming what is wrong.
pub fn parse_completion(body: &[u8]) -> Result<ParsedRequest, ApiError> {
    let wire: WireCompletion = parse_json(body)?;
    check_model_name(&wire.model)?;
    let prompt = match wire.prompt {
        WirePrompt::One(p) => p,
        WirePrompt::Many(mut v) if v.len() == 1 => v.remove(0),
        WirePrompt::Many(v) => {
            return Err(ApiError::invalid(format!(
                "`prompt` has {} entries; this server takes one prompt per request",
                v.len()
            ))
            .param("prompt"));
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("`prompt` is empty").param("prompt"));
    }
    let mut sampling = wire.sampling;
    let format = check_response_format(sampling.response_format.take())?;
    // OpenAI's default for the legacy endpoint.
    if sampling.max_tokens.is_none() && sampling.max_completion_tokens.is_none() {
        sampling.max_tokens = Some(16);
    }
    let (sampling, stream, include_usage) = check_sampling(sampling, Endpoint::Completion)?;
    Ok(ParsedRequest {
        endpoint: Endpoint::Completion,
        model: wire.model,
        prompt: PromptInput::Text(prompt),
        sampling,
        stream,
        include_usage,
        chat: crate::tools::ChatControls {
            format,
            ..crate::tools::ChatControls::default()
        },
    })
}

fn in_range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(x.is_finite() && (lo..=hi).contains(&x)) => {
            Err(ApiError::invalid(format!("`{name}` = {x} is outside {lo}..={hi}")).param(name))
        }
        other => Ok(other),
    }
}

fn check_model_name(model: &str) -> Result<(), ApiError> {
    if model.len() > MAX_MODEL_NAME_BYTES {
        return Err(ApiError::invalid(format!(
            "`model` is {} bytes long; at most {MAX_MODEL_NAME_BYTES}",
            model.len()
        ))
        .param("model"));
    }
    Ok(())
}

/// Refuses the fields this server does not implement when they ask for something:
/// a client that asks for them must not get a plain completion that silently
/// ignored them.
fn refuse_unimplemented(w: &WireSampling) -> Result<(), ApiError> {
    use serde_json::Value;
    let asks = |v: &Option<Value>| match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(_)) | Some(Value::Bool(true)) => true,
    };
    let fields: &[(&str, &Option<Value>)] = &[
        ("tools", &w.tools),
        ("functions", &w.functions),
        ("function_call", &w.function_call),
        ("echo", &w.echo),
        ("suffix", &w.suffix),
    ];
    for &(name, value) in fields {
        if asks(value) {
            return Err(ApiError::invalid(format!(
                "`{name}` is not supported by this server yet; leave it out"
            ))
            .param(name)
            .code("unsupported_parameter"));
        }
    }
    // `tool_choice: "none"` and `"auto"` with no tools ask for nothing.
    if let Some(choice) = &w.tool_choice
        && !matches!(choice, Value::Null)
        && !matches!(choice.as_str(), Some("none" | "auto"))
    {
        return Err(ApiError::invalid(
            "`tool_choice` is not supported by this server yet; leave it out",
        )
        .param("tool_choice")
        .code("unsupported_parameter"));
    }
    if let Some(best_of) = &w.best_of
        && !matches!(best_of, Value::Null)
        && best_of.as_u64() != Some(1)
    {
        return Err(ApiError::invalid("`best_of` must be 1 on this server")
            .param("best_of")
            .code("unsupported_parameter"));
    }
    Ok(())
}

/// The most bytes a `response_format` JSON schema may have, serialized.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// `response_format`: `{"type": "text"}` (the default: free text), `{"type":
/// "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
/// {"name", "schema", "strict"}}` (JSON that validates against the schema). Both JSON
/// kinds are enforced token by token whether `strict` is set or not; a schema the
/// grammar compiler cannot enforce or satisfy is a 400 here, before anything runs.
pub(crate) fn check_response_format(
    v: Option<serde_json::Value>,
) -> Result<Option<afo_runtime::engine::Constraint>, ApiError> {
    use afo_runtime::engine::Constraint;
    use serde_json::Value;
    let bad = |param: &str, m: String| ApiError::invalid(m).param(param);
    let mut format = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(bad(
                "response_format",
                format!("`response_format` must be an object with a `type`, not `{other}`"),
            ));
        }
    };
    let constraint = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => Constraint::json_object(),
        Some("json_schema") => {
            let Some(Value::Object(mut spec)) = format.remove("json_schema") else {
                return Err(bad(
                    "response_format.json_schema",
                    "`response_format.json_schema` must be an object with a `schema`".into(),
                ));
            };
            match spec.get("name") {
                None | Some(Value::String(_)) => {}
                Some(other) => {
                    return Err(bad(
                        "response_format.json_schema.name",
                        format!(
                            "`response_format.json_schema.name` must be a string, not `{other}`"
                        ),
                    ));
                }
            }
            match spec.get("strict") {
                None | Some(Value::Null | Value::Bool(_)) => {}
                Some(other) => {
                    return Err(bad(
                        "response_format.json_schema.strict",
                        format!(
                            "`response_format.json_schema.strict` must be true or false, not `{other}`"
                        ),
                    ));
                }
            }
            let schema = match spec.remove("schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => schema,
                None => serde_json::json!({}),
                Some(other) => {
                    return Err(bad(
                        "response_format.json_schema.schema",
                        format!(
                            "`response_format.json_schema.schema` must be a JSON schema object, not `{other}`"
                        ),
                    ));
                }
            };
            let bytes = schema.to_string().len();
            if bytes > MAX_SCHEMA_BYTES {
                return Err(bad(
                    "response_format.json_schema.schema",
                    format!("the schema has {bytes} bytes; at most {MAX_SCHEMA_BYTES}"),
                ));
            }
            Constraint::json_schema(schema)
        }
        Some(other) => {
            return Err(bad(
                "response_format.type",
                format!(
                    "`response_format.type` `{other}` is not one of text, json_object, json_schema"
                ),
            ));
        }
        None => {
            return Err(bad(
                "response_format.type",
                "`response_format` needs a `type`: text, json_object or json_schema".into(),
            ));
        }
    };
    constraint.check().map_err(|e| {
        let param = if matches!(constraint, Constraint::JsonSchema(_)) {
            "response_format.json_schema.schema"
        } else {
            "response_format"
        };
        bad(
            param,
            format!("the response format cannot be enforced: {e}"),
        )
    })?;
    Ok(Some(constraint))
}

/// `logit_bias`: an object from token ids (as strings) to biases in -100..=100.
fn check_logit_bias(v: Option<&serde_json::Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    use serde_json::Value;
    let bad = |m: String| ApiError::invalid(m).param("logit_bias");
    let map = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(bad(
                "`logit_bias` must be an object from token ids to biases".into(),
            ));
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(bad(format!(
            "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS}",
            map.len()
        )));
    }
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let id: u32 = key.parse().map_err(|_| {
            bad(format!(
                "`logit_bias` key `{key}` is not a token id (a non-negative integer)"
            ))
        })?;
        // Biases are applied as f32 logits.
        #[allow(clippy::cast_possible_truncation)]
        let bias = value.as_f64().map(|b| b as f32);
        match bias {
            Some(b) if (-100.0..=100.0).contains(&b) => out.push((id, b)),
            _ => {
                return Err(bad(format!(
                    "`logit_bias` for token {id} is {value}; give a number in -100..=100"
                )));
            }
        }
    }
    out.sort_by_key(|&(id, _)| id);
    Ok(out)
}

/// The log-probabilities asked for: chat takes `logprobs: true` with
/// `top_logprobs: 0..=20`, completions `logprobs: 0..=20` (the alternatives).
fn check_logprobs(w: &WireSampling, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    use serde_json::Value;
    let max = afo_runtime::engine::MAX_TOP_LOGPROBS;
    let count = |name: &str, v: &Value| -> Result<usize, ApiError> {
        v.as_u64()
            .and_then(|k| usize::try_from(k).ok())
            .filter(|&k| k <= max)
            .ok_or_else(|| {
                ApiError::invalid(format!("`{name}` is {v}; give an integer in 0..={max}"))
                    .param(name)
            })
    };
    let top = match &w.top_logprobs {
        None | Some(Value::Null) => None,
        Some(v) => Some(count("top_logprobs", v)?),
    };
    match endpoint {
        Endpoint::Chat => {
            let on = match &w.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(v) => {
                    return Err(ApiError::invalid(format!(
                        "`logprobs` is {v}; give true or false (the alternatives go in `top_logprobs`)"
                    ))
                    .param("logprobs"));
                }
            };
            if !on && top.is_some_and(|k| k > 0) {
                return Err(ApiError::invalid("`top_logprobs` needs `logprobs: true`")
                    .param("top_logprobs"));
            }
            Ok(on.then_some(top.unwrap_or(0)))
        }
        Endpoint::Completion => {
            if top.is_some() {
                return Err(ApiError::invalid(
                    "`top_logprobs` is a chat field; completions take `logprobs: k`",
                )
                .param("top_logprobs"));
            }
            match &w.logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(v) => count("logprobs", v).map(Some),
            }
        }
    }
}

fn check_sampling(w: WireSampling, endpoint: Endpoint) -> Result<(Sampling, bool, bool), ApiError> {
    refuse_unimplemented(&w)?;
    let n = match w.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => usize::try_from(n).unwrap_or(1),
        Some(n) => {
            return Err(
                ApiError::invalid(format!("`n` = {n}: give 1 to {MAX_CHOICES} choices")).param("n"),
            );
        }
    };
    let logit_bias = check_logit_bias(w.logit_bias.as_ref())?;
    let logprobs = check_logprobs(&w, endpoint)?;
    let max = w.max_completion_tokens.or(w.max_tokens);
    let max_tokens = match max {
        Some(0) => {
            return Err(ApiError::invalid("`max_tokens` must be at least 1").param("max_tokens"));
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        None => None,
    };
    let temperature = in_range("temperature", w.temperature, 0.0, 2.0)?;
    let top_p = match w.top_p {
        Some(p) if !(p.is_finite() && p > 0.0 && p <= 1.0) => {
            return Err(
                ApiError::invalid(format!("`top_p` = {p} is outside (0, 1]")).param("top_p"),
            );
        }
        other => other,
    };
    let presence_penalty = in_range("presence_penalty", w.presence_penalty, -2.0, 2.0)?;
    let frequency_penalty = in_range("frequency_penalty", w.frequency_penalty, -2.0, 2.0)?;
    let stop = match w.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(format!(
            "`stop` has {} strings; at most {MAX_STOP_STRINGS}",
            stop.len()
        ))
        .param("stop"));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("`stop` holds an empty string").param("stop"));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(format!(
            "`stop` holds a string of {} bytes; at most {MAX_STOP_BYTES}",
            long.len()
        ))
        .param("stop"));
    }
    let stream = w.stream.unwrap_or(false);
    let include_usage = w
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok((
        Sampling {
            max_tokens,
            temperature,
            top_p,
            top_k: None,
            seed: w.seed,
            stop,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            logprobs,
            n,
        },
        stream,
        include_usage,
    ))
}

/// The file signatures of the image formats accepted.
fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else {
        None
    }
}

/// Decodes a `data:image/...;base64,...` URL, checking its size and that the bytes
/// start like a PNG, JPEG, WebP or GIF file.
///
/// # Errors
/// A 400 [`ApiError`] naming the problem (not a data URL, not base64, too large,
/// not an image).
pub fn decode_data_url(url: &str, max_bytes: usize) -> Result<ImageInput, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            "image_url must be a `data:image/...;base64,...` URL; this server fetches no remote URLs",
        )
        .code("invalid_image_url"));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(
            ApiError::invalid("image_url data URL has no `,` before its data")
                .code("invalid_image_url"),
        );
    };
    let Some(media_type) = meta.strip_suffix(";base64") else {
        return Err(
            ApiError::invalid("image_url data URL is not base64 (`;base64,` is missing)")
                .code("invalid_image_url"),
        );
    };
    if !media_type.starts_with("image/") {
        return Err(ApiError::invalid(format!(
            "image_url data URL has media type `{media_type}`, not an image/* type"
        ))
        .code("invalid_image_url"));
    }
    // Base64 takes 4 characters per 3 bytes: refuse before decoding anything too big.
    if data.len() / 4 * 3 > max_bytes.saturating_add(3) {
        return Err(ApiError::invalid(format!(
            "image of about {} bytes is larger than the limit of {max_bytes} bytes",
            data.len() / 4 * 3
        ))
        .code("image_too_large"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| {
            ApiError::invalid(format!("image_url data URL is not valid base64: {e}"))
                .code("invalid_image_url")
        })?;
    if bytes.len() > max_bytes {
        return Err(ApiError::invalid(format!(
            "image of {} bytes is larger than the limit of {max_bytes} bytes",
            bytes.len()
        ))
        .code("image_too_large"));
    }
    if sniff_image(&bytes).is_none() {
        return Err(
            ApiError::invalid("image_url data is not a PNG, JPEG, WebP or GIF file")
                .code("invalid_image"),
        );
    }
    Ok(ImageInput {
        media_type: media_type.to_owned(),
        bytes,
        part: String::new(),
    })
}

/// `usage` of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage of a run.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

    #[test]
    fn chat_with_string_and_parts() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"stop":"x"}"#;
        let r = parse_chat(body, &ParseLimits::default()).unwrap();
        let PromptInput::Chat(m) = &r.prompt else {
            panic!("chat")
        };
        assert_eq!(m[0].text, "be brief");
        assert_eq!(m[1].text, "a\nb");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert_eq!(r.sampling.stop, vec!["x".to_owned()]);
        assert_eq!(r.prompt.routing_text(), "a\nb");
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let l = ParseLimits::default();
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "not valid JSON"),
            (br#"{"model":1,"messages":[]}"#, "does not match"),
            (br#"{"model":"m","messages":[]}"#, "`messages` is empty"),
            (
                br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                "role `robot`",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":9}"#,
                "`n` = 9",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":9}"#,
                "temperature",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "at least 1",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio"}]}]}"#,
                "part type",
            ),
        ];
        for (body, want) in cases {
            let e = parse_chat(body, &l).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(body));
            assert!(
                e.message.contains(want),
                "{} -> {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }

    #[test]
    fn data_urls() {
        let ok = decode_data_url(&format!("data:image/png;base64,{PNG_1X1}"), 1000).unwrap();
        assert_eq!(ok.media_type, "image/png");
        assert!(ok.bytes.starts_with(b"\x89PNG"));
        for (url, code) in [
            ("https://example.com/cat.png", "invalid_image_url"),
            ("data:image/png;base64", "invalid_image_url"),
            ("data:text/plain;base64,aGVsbG8=", "invalid_image_url"),
            ("data:image/png;base64,@@@@", "invalid_image_url"),
            ("data:image/png;base64,aGVsbG8gd29ybGQ=", "invalid_image"),
        ] {
            assert_eq!(
                decode_data_url(url, 1000).unwrap_err().code,
                Some(code),
                "{url}"
            );
        }
        let e = decode_data_url(&format!("data:image/png;base64,{PNG_1X1}"), 10).unwrap_err();
        assert_eq!(e.code, Some("image_too_large"));
    }

    #[test]
    fn completion_prompt_forms() {
        let r = parse_completion(br#"{"model":"m","prompt":["once"]}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Text("once".into()));
        assert_eq!(r.sampling.max_tokens, Some(16));
        assert!(parse_completion(br#"{"model":"m","prompt":["a","b"]}"#).is_err());
        assert!(parse_completion(br#"{"model":"m","prompt":""}"#).is_err());
    }
}
