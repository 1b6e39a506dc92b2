//! A chat model's output read as an assistant message: reasoning, content and tool
//! calls.
//!
//! [`ChatOutputParser`] chains the [`ReasoningParser`] (the `<think>` block comes
//! first) and, when tools were offered, the [`ToolCallParser`] over the content that
//! follows. Streamed or whole ([`ChatOutput::parse`]), the result is the same.

use crate::chat::ChatPrompt;
use crate::reasoning::{ReasoningEvent, ReasoningParser};
use crate::tools::{ToolCall, ToolCallFormat, ToolCallParser, ToolEvent};

/// A piece of an assistant message, as it streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// Text of the reasoning.
    Reasoning(String),
    /// Text of the content.
    Content(String),
    /// A complete tool call.
    ToolCall(ToolCall),
}

/// A whole assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatOutput {
    /// The reasoning, `None` when the model did not reason.
    pub reasoning: Option<String>,
    /// The content (empty when the model only called tools).
    pub content: String,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

impl ChatOutput {
    /// Reads a whole output with `parser`.
    pub fn parse(mut parser: ChatOutputParser, text: &str) -> Self {
        let mut out = Self::default();
        for e in parser.push(text).into_iter().chain(parser.finish()) {
            out.add(e);
        }
        if !out.tool_calls.is_empty() && out.content.trim().is_empty() {
            out.content.clear();
        }
        out
    }

    /// Adds a streamed piece.
    pub fn add(&mut self, event: ChatEvent) {
        match event {
            ChatEvent::Reasoning(t) => self.reasoning.get_or_insert_default().push_str(&t),
            ChatEvent::Content(t) => self.content.push_str(&t),
            ChatEvent::ToolCall(c) => self.tool_calls.push(c),
        }
    }
}

/// Splits a streamed output into reasoning, content and tool calls.
#[derive(Debug, Clone)]
pub struct ChatOutputParser {
    reasoning: ReasoningParser,
    tools: Option<ToolCallParser>,
}

impl ChatOutputParser {
    /// A parser; `inside_reasoning` when the prompt opened a `<think>` block, and
    /// `tools` the call format when tools were offered (otherwise calls are not
    /// looked for).
    pub fn new(inside_reasoning: bool, tools: Option<ToolCallFormat>) -> Self {
        Self {
            reasoning: ReasoningParser::new(inside_reasoning),
            tools: tools.map(ToolCallParser::new),
        }
    }

    /// The parser for the output of `prompt`, looking for tool calls when
    /// `tools_offered`.
    pub fn for_prompt(prompt: &ChatPrompt, tools_offered: bool) -> Self {
        Self::new(
            prompt.opens_reasoning,
            tools_offered.then_some(prompt.tool_format),
        )
    }

    /// Calls get the ids `{prefix}0`, `{prefix}1`, ... (default `call_`).
    pub fn with_id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.tools = self.tools.map(|t| t.with_id_prefix(prefix));
        self
    }

    /// Takes the next text delta; returns what is now decided.
    pub fn push(&mut self, delta: &str) -> Vec<ChatEvent> {
        let events = self.reasoning.push(delta);
        self.route(events, false)
    }

    /// Ends the output, releasing what was held back.
    pub fn finish(&mut self) -> Vec<ChatEvent> {
        let events = self.reasoning.finish();
        self.route(events, true)
    }

    fn route(&mut self, events: Vec<ReasoningEvent>, end: bool) -> Vec<ChatEvent> {
        let mut out = Vec::new();
        for e in events {
            match e {
                ReasoningEvent::Reasoning(t) => out.push(ChatEvent::Reasoning(t)),
                ReasoningEvent::Content(t) => match &mut self.tools {
                    Some(p) => out.extend(p.push(&t).into_iter().map(from_tool)),
                    None => out.push(ChatEvent::Content(t)),
                },
            }
        }
        if end && let Some(p) = &mut self.tools {
            out.extend(p.finish().into_iter().map(from_tool));
        }
        out
    }
}

fn from_tool(e: ToolEvent) -> ChatEvent {
    match e {
        ToolEvent::Content(t) => ChatEvent::Content(t),
        ToolEvent::Call(c) => ChatEvent::ToolCall(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_then_a_call_in_any_pieces() {
        let text = "<think>\nI should look it up.\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"x\"}}\n</tool_call>";
        let whole = ChatOutput::parse(
            ChatOutputParser::new(false, Some(ToolCallFormat::Hermes)),
            text,
        );
        assert_eq!(whole.reasoning.as_deref(), Some("I should look it up."));
        assert_eq!(whole.content, "");
        assert_eq!(whole.tool_calls.len(), 1);
        for (i, _) in text.char_indices() {
            let mut p = ChatOutputParser::new(false, Some(ToolCallFormat::Hermes));
            let mut out = ChatOutput::default();
            for e in p
                .push(&text[..i])
                .into_iter()
                .chain(p.push(&text[i..]))
                .chain(p.finish())
            {
                out.add(e);
            }
            assert_eq!(out, whole, "split at byte {i}");
        }
    }
}
