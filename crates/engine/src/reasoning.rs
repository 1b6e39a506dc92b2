//! Reasoning: a model's `<think>...</think>` block apart from its answer.
//!
//! Models such as Qwen3 and DeepSeek-R1 think before they answer, between
//! [`THINK_OPEN`] and [`THINK_CLOSE`]. [`ReasoningParser`] splits their output into
//! reasoning and content, whole ([`ReasoningParser::split`]) or as it streams
//! ([`ReasoningParser::push`]), holding back text that might be the start of a
//! marker so that no partial `</think>` reaches either side; any split of the output
//! into pieces gives the same result as the whole. Some templates open `<think>` in the
//! prompt itself (the generation prompt ends inside the block): build the parser with
//! [`ReasoningParser::new`]`(true)` there ([`prompt_opens_reasoning`] tells from the
//! rendered prompt). Whitespace around the markers is layout: reasoning and content
//! come without the blank lines the model writes around them.

use crate::tools::partial_suffix;

/// The marker that opens reasoning.
pub const THINK_OPEN: &str = "<think>";
/// The marker that closes reasoning.
pub const THINK_CLOSE: &str = "</think>";

/// Whether a rendered prompt ends inside a reasoning block: its last `<think>` is not
/// closed (a template that opens the block in the generation prompt).
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    match (prompt.rfind(THINK_OPEN), prompt.rfind(THINK_CLOSE)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A piece of a model's output, as [`ReasoningParser`] splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningEvent {
    /// Text of the reasoning.
    Reasoning(String),
    /// Text of the answer.
    Content(String),
}

/// Reasoning and content of a whole output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitOutput {
    /// The reasoning, `None` when the model did not reason.
    pub reasoning: Option<String>,
    /// The answer.
    pub content: String,
}

impl SplitOutput {
    fn add(&mut self, event: ReasoningEvent) {
        match event {
            ReasoningEvent::Reasoning(t) => self.reasoning.get_or_insert_default().push_str(&t),
            ReasoningEvent::Content(t) => self.content.push_str(&t),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before anything: the output may open with `<think>` (after whitespace).
    Start,
    /// Inside the reasoning.
    Reasoning,
    /// Right after `</think>`: whitespace is skipped.
    AfterClose,
    /// The answer.
    Content,
}

/// Splits a streamed output into reasoning and content.
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    buf: String,
    /// Whitespace inside the reasoning, held until more reasoning follows it.
    space: String,
    /// Whether any reasoning was seen (an empty block still counts).
    reasoned: bool,
    /// Whether reasoning text was sent.
    sent: bool,
}

impl ReasoningParser {
    /// A parser; `inside` when the prompt already opened the reasoning block.
    pub fn new(inside: bool) -> Self {
        Self {
            state: if inside {
                State::Reasoning
            } else {
                State::Start
            },
            buf: String::new(),
            space: String::new(),
            reasoned: inside,
            sent: false,
        }
    }

    /// Splits a whole output.
    pub fn split(inside: bool, text: &str) -> SplitOutput {
        let mut p = Self::new(inside);
        let mut out = SplitOutput::default();
        for e in p.push(text).into_iter().chain(p.finish()) {
            out.add(e);
        }
        if p.reasoned && out.reasoning.is_none() {
            out.reasoning = Some(String::new());
        }
        out
    }

    /// Whether the output is inside the reasoning now.
    pub fn in_reasoning(&self) -> bool {
        self.state == State::Reasoning
    }

    /// Takes the next text delta; returns what is now decided.
    pub fn push(&mut self, delta: &str) -> Vec<ReasoningEvent> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        self.drain(&mut out, false);
        out
    }

    /// Ends the output, releasing held text (an unclosed reasoning block stays
    /// reasoning).
    pub fn finish(&mut self) -> Vec<ReasoningEvent> {
        let mut out = Vec::new();
        self.drain(&mut out, true);
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Reasoning => self.reasoning(&rest, &mut out),
            _ => {
                if !rest.is_empty() {
                    out.push(ReasoningEvent::Content(rest));
                }
            }
        }
        out
    }

    fn drain(&mut self, out: &mut Vec<ReasoningEvent>, end: bool) {
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_OPEN) {
                        self.buf = rest.trim_start().to_owned();
                        self.state = State::Reasoning;
                        self.reasoned = true;
                        continue;
                    }
                    if !end && (trimmed.is_empty() || THINK_OPEN.starts_with(trimmed)) {
                        return;
                    }
                    self.state = State::Content;
                }
                State::Reasoning => {
                    if let Some(at) = self.buf.find(THINK_CLOSE) {
                        let before = self.buf[..at].to_owned();
                        self.reasoning(&before, out);
                        self.space.clear();
                        self.buf.drain(..at + THINK_CLOSE.len());
                        self.state = State::AfterClose;
                        continue;
                    }
                    let keep = partial_suffix(&self.buf, THINK_CLOSE);
                    let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                    self.reasoning(&text, out);
                    return;
                }
                State::AfterClose => {
                    let trimmed = self.buf.trim_start();
                    if trimmed.is_empty() {
                        self.buf.clear();
                        return;
                    }
                    self.buf = trimmed.to_owned();
                    self.state = State::Content;
                }
                State::Content => {
                    if !self.buf.is_empty() {
                        out.push(ReasoningEvent::Content(std::mem::take(&mut self.buf)));
                    }
                    return;
                }
            }
        }
    }

    /// Sends reasoning, without the block's leading whitespace and holding
    /// trailing whitespace until more reasoning follows it.
    fn reasoning(&mut self, text: &str, out: &mut Vec<ReasoningEvent>) {
        let text = if self.sent { text } else { text.trim_start() };
        let body = text.trim_end();
        if body.is_empty() {
            if self.sent {
                self.space.push_str(text);
            }
            return;
        }
        let mut piece = std::mem::take(&mut self.space);
        piece.push_str(body);
        self.space.push_str(&text[body.len()..]);
        self.sent = true;
        match out.last_mut() {
            Some(ReasoningEvent::Reasoning(last)) => last.push_str(&piece),
            _ => out.push(ReasoningEvent::Reasoning(piece)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_in_pieces(inside: bool, text: &str) -> SplitOutput {
        let whole = ReasoningParser::split(inside, text);
        for (i, _) in text.char_indices().chain([(text.len(), ' ')]) {
            let mut p = ReasoningParser::new(inside);
            let mut out = SplitOutput::default();
            for e in p
                .push(&text[..i])
                .into_iter()
                .chain(p.push(&text[i..]))
                .chain(p.finish())
            {
                out.add(e);
            }
            if p.reasoned && out.reasoning.is_none() {
                out.reasoning = Some(String::new());
            }
            assert_eq!(out, whole, "split at byte {i} of {text:?}");
        }
        whole
    }

    #[test]
    fn splits_a_think_block() {
        let out = same_in_pieces(false, "<think>\nLet me see: 2 + 2.\n</think>\n\nIt is 4.");
        assert_eq!(out.reasoning.as_deref(), Some("Let me see: 2 + 2."));
        assert_eq!(out.content, "It is 4.");
    }

    #[test]
    fn a_prompt_that_opened_the_block() {
        let out = same_in_pieces(true, "thinking...\n</think>\n\nAnswer <think> kept");
        assert_eq!(out.reasoning.as_deref(), Some("thinking..."));
        assert_eq!(out.content, "Answer <think> kept");
        let open = same_in_pieces(true, "still thinking </thi");
        assert_eq!(open.reasoning.as_deref(), Some("still thinking </thi"));
        assert_eq!(open.content, "");
    }

    #[test]
    fn no_reasoning_and_an_empty_block() {
        let plain = same_in_pieces(false, "  Just an answer. ");
        assert_eq!(plain.reasoning, None);
        assert_eq!(plain.content, "  Just an answer. ");
        let empty = same_in_pieces(false, "<think>\n\n</think>\n\nHi");
        assert_eq!(empty.reasoning.as_deref(), Some(""));
        assert_eq!(empty.content, "Hi");
        assert!(prompt_opens_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_reasoning("<think>\n\n</think>\n\n"));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n"));
    }
}
