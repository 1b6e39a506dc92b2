//! Tool calling and reasoning on `/v1/chat/completions`: the request fields
//! (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and `tool`
//! messages in the history, `reasoning_effort`, `chat_template_kwargs`) checked into
//! engine types, and the model's output read back as `reasoning_content`, `content`
//! and `tool_calls`, whole or as stream deltas.

use afo_runtime::engine::{
    ChatEvent, ChatOptions, ChatOutput, ChatOutputParser, Constraint, LoadedModel, Message,
    ReasoningBudget, ToolCall, ToolChoice, ToolDefinition, tool_call_grammar,
};
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::openai::ChatMessage;

/// The most tools one request may offer.
pub(crate) const MAX_TOOLS: usize = 128;

/// What a chat request asks beyond its messages: tools and thinking.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatControls {
    /// The tools offered (empty with `tool_choice: "none"`).
    pub tools: Vec<ToolDefinition>,
    /// `tool_choice`.
    pub tool_choice: ToolChoice,
    /// `parallel_tool_calls` (default true).
    pub parallel_tool_calls: bool,
    /// `enable_thinking` for the template, from `chat_template_kwargs` or
    /// `reasoning_effort`.
    pub enable_thinking: Option<bool>,
    /// `response_format`: what the output must be (`json_object` or a
    /// `json_schema`), enforced token by token; `None` for free text.
    pub format: Option<Constraint>,
    /// `max_reasoning_tokens`: the most tokens the `<think>` block may take.
    pub max_reasoning_tokens: Option<usize>,
}

impl Default for ChatControls {
    fn default() -> Self {
        Self {
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: true,
            enable_thinking: None,
            format: None,
            max_reasoning_tokens: None,
        }
    }
}

fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(message).param(param)
}

/// Checks `tools`, `tool_choice`, `parallel_tool_calls`, `reasoning_effort` and
/// `chat_template_kwargs`.
///
/// # Errors
/// A 400 naming the field.
pub(crate) fn parse_controls(
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
    reasoning_effort: Option<Value>,
    chat_template_kwargs: Option<Value>,
) -> Result<ChatControls, ApiError> {
    let tools = parse_tools(tools)?;
    let tool_choice = parse_tool_choice(tool_choice, &tools)?;
    let parallel_tool_calls = match parallel_tool_calls {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(bad(
                "parallel_tool_calls",
                format!("`parallel_tool_calls` must be true or false, not `{other}`"),
            ));
        }
    };
    let mut enable_thinking = match reasoning_effort {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) => match e.as_str() {
            "none" | "minimal" => Some(false),
            "low" | "medium" | "high" => Some(true),
            other => {
                return Err(bad(
                    "reasoning_effort",
                    format!(
                        "`reasoning_effort` `{other}` is not one of none, minimal, low, medium, high"
                    ),
                ));
            }
        },
        Some(other) => {
            return Err(bad(
                "reasoning_effort",
                format!("`reasoning_effort` must be a string, not `{other}`"),
            ));
        }
    };
    match chat_template_kwargs {
        None | Some(Value::Null) => {}
        Some(Value::Object(kwargs)) => {
            for (key, value) in kwargs {
                match (key.as_str(), value) {
                    ("enable_thinking", Value::Bool(b)) => enable_thinking = Some(b),
                    ("enable_thinking", other) => {
                        return Err(bad(
                            "chat_template_kwargs.enable_thinking",
                            format!("`enable_thinking` must be true or false, not `{other}`"),
                        ));
                    }
                    (other, _) => {
                        return Err(bad(
                            format!("chat_template_kwargs.{other}"),
                            format!(
                                "`chat_template_kwargs.{other}` is not supported; this server passes `enable_thinking` only"
                            ),
                        )
                        .code("unsupported_parameter"));
                    }
                }
            }
        }
        Some(other) => {
            return Err(bad(
                "chat_template_kwargs",
                format!("`chat_template_kwargs` must be an object, not `{other}`"),
            ));
        }
    }
    let tools = if tool_choice == ToolChoice::None {
        Vec::new()
    } else {
        tools
    };
    Ok(ChatControls {
        tools,
        tool_choice,
        parallel_tool_calls,
        enable_thinking,
        format: None,
        max_reasoning_tokens: None,
    })
}

fn parse_tools(tools: Option<Value>) -> Result<Vec<ToolDefinition>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(bad(
                "tools",
                format!("`tools` must be a list, not `{other}`"),
            ));
        }
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(
            "tools",
            format!("`tools` has {} tools; at most {MAX_TOOLS}", list.len()),
        ));
    }
    let mut out: Vec<ToolDefinition> = Vec::with_capacity(list.len());
    for (i, tool) in list.into_iter().enumerate() {
        let at = format!("tools[{i}]");
        let Value::Object(mut tool) = tool else {
            return Err(bad(at.clone(), format!("`{at}` must be an object")));
        };
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            _ => {
                return Err(bad(
                    format!("{at}.type"),
                    format!("`{at}.type` must be `function` (the only tool type here)"),
                ));
            }
        }
        let Some(Value::Object(mut function)) = tool.remove("function") else {
            return Err(bad(
                format!("{at}.function"),
                format!("`{at}.function` must be an object with a `name`"),
            ));
        };
        let Some(Value::String(name)) = function.remove("name") else {
            return Err(bad(
                format!("{at}.function.name"),
                format!("`{at}.function.name` must be a string"),
            ));
        };
        let description = match function.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d),
            Some(_) => {
                return Err(bad(
                    format!("{at}.function.description"),
                    format!("`{at}.function.description` must be a string"),
                ));
            }
        };
        let parameters = function.remove("parameters").unwrap_or(Value::Null);
        let tool = ToolDefinition::new(name, description, parameters)
            .map_err(|e| bad(format!("{at}.function"), format!("`{at}.function`: {e}")))?;
        if out.iter().any(|t| t.name == tool.name) {
            return Err(bad(
                format!("{at}.function.name"),
                format!("`{at}.function.name` `{}` is given twice", tool.name),
            ));
        }
        out.push(tool);
    }
    Ok(out)
}

fn parse_tool_choice(
    choice: Option<Value>,
    tools: &[ToolDefinition],
) -> Result<ToolChoice, ApiError> {
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("`tool_choice` `{other}` is not one of none, auto, required"),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolChoice::Function(name.to_owned()),
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "`tool_choice` as an object must be `{\"type\": \"function\", \"function\": {\"name\": ...}}`",
                    ));
                }
            }
        }
        Some(other) => {
            return Err(bad(
                "tool_choice",
                format!("`tool_choice` must be a string or an object, not `{other}`"),
            ));
        }
    };
    match &choice {
        ToolChoice::Required if tools.is_empty() => Err(bad(
            "tool_choice",
            "`tool_choice` is `required` but `tools` is empty",
        )),
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.name == name) => Err(bad(
            "tool_choice",
            format!("`tool_choice` names function `{name}`, which is not in `tools`"),
        )),
        _ => Ok(choice),
    }
}

/// An assistant message's `tool_calls` (OpenAI's shape, arguments as JSON text)
/// as engine calls; `at` is the message's place (`messages[3]`).
///
/// # Errors
/// A 400 naming the field.
pub(crate) fn parse_history_calls(calls: Value, at: &str) -> Result<Vec<ToolCall>, ApiError> {
    let list = match calls {
        Value::Null => return Ok(Vec::new()),
        Value::Array(list) => list,
        other => {
            return Err(bad(
                format!("{at}.tool_calls"),
                format!("`{at}.tool_calls` must be a list, not `{other}`"),
            ));
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, call) in list.into_iter().enumerate() {
        let here = format!("{at}.tool_calls[{j}]");
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("call_{j}"));
        let function = call.get("function");
        let Some(name) = function.and_then(|f| f.get("name")).and_then(Value::as_str) else {
            return Err(bad(
                format!("{here}.function.name"),
                format!("`{here}.function.name` must be a string"),
            ));
        };
        let arguments = match function.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(m)) => m,
                _ => {
                    return Err(bad(
                        format!("{here}.function.arguments"),
                        format!("`{here}.function.arguments` is not the JSON text of an object"),
                    ));
                }
            },
            Some(_) => {
                return Err(bad(
                    format!("{here}.function.arguments"),
                    format!("`{here}.function.arguments` must be JSON text"),
                ));
            }
        };
        out.push(ToolCall {
            id,
            name: name.to_owned(),
            arguments,
        });
    }
    Ok(out)
}

/// How to read a chat's output, and the constraint its output follows.
#[derive(Debug)]
pub(crate) struct Reading {
    /// Splits the output into reasoning, content and tool calls.
    pub parser: ChatOutputParser,
    /// The grammar of `tool_choice: required` or a named function, else the
    /// `response_format`'s.
    pub constraint: Option<Constraint>,
    /// The reasoning budget (`max_reasoning_tokens`) and whether the prompt opened
    /// the block.
    pub budget: Option<ReasoningBudget>,
}

impl Reading {
    /// The reading of a plain-text prompt: no reasoning, no tools, the request's
    /// `response_format`.
    pub(crate) fn plain(format: Option<Constraint>) -> Self {
        Self {
            parser: ChatOutputParser::new(false, None),
            constraint: format,
            budget: None,
        }
    }
}

/// Whether `chat` constrains the output from its first token (a forced tool call or
/// a `response_format`): the answer then starts at once, with thinking off.
fn constrained(chat: &ChatControls) -> bool {
    chat.format.is_some()
        || matches!(
            chat.tool_choice,
            ToolChoice::Required | ToolChoice::Function(_)
        )
}

/// Encodes a chat for a text model with its tools and thinking, and says how to
/// read the output. A constrained output (a forced tool call, a `response_format`)
/// starts with the answer: the template is asked not to think (`enable_thinking`
/// false), and the output is read as the answer even if the template opened a
/// thinking block anyway.
///
/// # Errors
/// A 400 when the template fails or a tool cannot be forced.
pub(crate) fn encode_chat(
    loaded: &LoadedModel,
    messages: &[ChatMessage],
    chat: &ChatControls,
) -> Result<(Vec<u32>, Reading), ApiError> {
    let messages: Vec<Message> = messages
        .iter()
        .map(|m| Message {
            tool_calls: m.tool_calls.clone(),
            tool_call_id: m.tool_call_id.clone(),
            ..Message::new(m.role.clone(), m.text.clone())
        })
        .collect();
    let constrained = constrained(chat);
    let options = ChatOptions {
        tools: chat.tools.clone(),
        enable_thinking: if constrained {
            Some(false)
        } else {
            chat.enable_thinking
        },
    };
    let prompt = loaded
        .encode_chat_with(&messages, &options)
        .map_err(|e| ApiError::invalid(format!("the prompt could not be encoded: {e}")))?;
    let offered = !chat.tools.is_empty();
    let grammar = tool_call_grammar(
        &chat.tools,
        &chat.tool_choice,
        prompt.tool_format,
        chat.parallel_tool_calls,
    )
    .map_err(|e| bad("tool_choice", e.to_string()))?;
    let parser = if constrained {
        ChatOutputParser::new(false, offered.then_some(prompt.tool_format))
    } else {
        ChatOutputParser::for_prompt(&prompt, offered)
    };
    let budget = chat
        .max_reasoning_tokens
        .filter(|_| !constrained)
        .map(|n| ReasoningBudget::new(n, prompt.opens_reasoning));
    let reading = Reading {
        parser,
        budget,
        constraint: grammar
            .map(Constraint::lark)
            .or_else(|| chat.format.clone()),
    };
    Ok((prompt.ids, reading))
}

/// A call in OpenAI's shape; `index` only in stream deltas.
fn call_json(call: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": call.id, "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json()},
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// The `finish_reason` of a chat choice: `tool_calls` when the model called tools
/// and stopped by itself.
pub(crate) fn finish_reason(called: bool, finish: &'static str) -> &'static str {
    if called && finish == "stop" {
        "tool_calls"
    } else {
        finish
    }
}

/// The whole assistant message read from `text`, and its `finish_reason`.
pub(crate) fn message(
    parser: ChatOutputParser,
    text: &str,
    finish: &'static str,
) -> (Value, &'static str) {
    let out = ChatOutput::parse(parser, text);
    let called = !out.tool_calls.is_empty();
    let mut m = json!({
        "role": "assistant",
        "content": if called && out.content.is_empty() { Value::Null } else { json!(out.content) },
    });
    if let Some(r) = out.reasoning {
        m["reasoning_content"] = json!(r);
    }
    if called {
        m["tool_calls"] = Value::Array(out.tool_calls.iter().map(|c| call_json(c, None)).collect());
    }
    (m, finish_reason(called, finish))
}

/// Stream deltas for parsed events; `calls` counts the calls sent so far (each
/// delta's `index`).
pub(crate) fn deltas(events: Vec<ChatEvent>, calls: &mut usize) -> Vec<Value> {
    events
        .into_iter()
        .map(|e| match e {
            ChatEvent::Reasoning(t) => json!({"reasoning_content": t}),
            ChatEvent::Content(t) => json!({"content": t}),
            ChatEvent::ToolCall(c) => {
                let v = json!({"tool_calls": [call_json(&c, Some(*calls))]});
                *calls += 1;
                v
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_tools_and_choice() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let c = parse_controls(
            Some(tools.clone()),
            Some(json!("required")),
            None,
            None,
            None,
        );
        assert_eq!(
            c.map(|c| (c.tools.len(), c.tool_choice)).ok(),
            Some((1, ToolChoice::Required))
        );
        let named = json!({"type": "function", "function": {"name": "g"}});
        let e = parse_controls(Some(tools.clone()), Some(named), None, None, None).err();
        assert_eq!(e.and_then(|e| e.param).as_deref(), Some("tool_choice"));
        let e = parse_controls(
            Some(json!([{"type": "function", "function": {"name": "a b"}}])),
            None,
            None,
            None,
            None,
        )
        .err();
        assert_eq!(
            e.and_then(|e| e.param).as_deref(),
            Some("tools[0].function")
        );
        let none = parse_controls(
            Some(tools),
            Some(json!("none")),
            None,
            Some(json!("high")),
            None,
        )
        .ok();
        assert_eq!(
            none.map(|c| (c.tools.len(), c.enable_thinking)),
            Some((0, Some(true)))
        );
        let kw = parse_controls(
            None,
            None,
            None,
            Some(json!("high")),
            Some(json!({"enable_thinking": false})),
        )
        .ok();
        assert_eq!(kw.map(|c| c.enable_thinking), Some(Some(false)));
    }

    #[test]
    fn history_calls_take_json_text_arguments() {
        let calls = json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        let parsed = parse_history_calls(calls, "messages[1]").ok();
        assert_eq!(
            parsed.map(|p| p[0].arguments.get("x").cloned()),
            Some(Some(json!(1)))
        );
        let bad = json!([{"function": {"name": "f", "arguments": "[1]"}}]);
        assert!(parse_history_calls(bad, "messages[1]").is_err());
    }
}
