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

/// A cap on a generation's reasoning: once the output has spent `max_tokens` tokens
/// inside its `<think>` block, the block is closed (the tokens of [`THINK_CLOSE`] are
/// generated in place of sampled ones) and the answer begins. Put it in
/// [`GenerateOptions::reasoning_budget`](crate::GenerateOptions::reasoning_budget).
///
/// The block is the one the output opens at its start (after whitespace), or the one
/// the prompt opened (`starts_inside`, from [`prompt_opens_reasoning`] or
/// [`ChatPrompt::opens_reasoning`](crate::ChatPrompt::opens_reasoning)). A generation
/// with a [`Constraint`](crate::Constraint) ignores the budget (the grammar decides
/// every token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasoningBudget {
    /// The most tokens the reasoning may take (0 closes it at once).
    pub max_tokens: usize,
    /// The prompt ends inside the block.
    pub starts_inside: bool,
}

impl ReasoningBudget {
    /// A budget of `max_tokens`; `starts_inside` when the prompt opened the block.
    pub fn new(max_tokens: usize, starts_inside: bool) -> Self {
        Self {
            max_tokens,
            starts_inside,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budgeting {
    /// Nothing but whitespace yet: the output may open the block.
    Before,
    /// Inside the block, this many tokens spent.
    Inside(usize),
    /// The block is closed, or there was none.
    After,
}

/// A [`ReasoningBudget`] applied to one generation: it reads the output as it comes
/// and says when to force the end of the block.
#[derive(Debug, Clone)]
pub(crate) struct BudgetState {
    budget: ReasoningBudget,
    state: Budgeting,
    /// The output's recent text (enough to see a marker split over tokens).
    window: String,
    /// The [`THINK_CLOSE`] tokens still to generate.
    forced: std::collections::VecDeque<u32>,
    close: Vec<u32>,
}

impl BudgetState {
    /// # Errors
    /// The tokenizer's, encoding [`THINK_CLOSE`].
    pub(crate) fn new(
        budget: ReasoningBudget,
        tokenizer: &crate::Tokenizer,
    ) -> crate::Result<Self> {
        let close = tokenizer.encode(THINK_CLOSE, false)?;
        let mut s = Self {
            budget,
            state: if budget.starts_inside {
                Budgeting::Inside(0)
            } else {
                Budgeting::Before
            },
            window: String::new(),
            forced: std::collections::VecDeque::new(),
            close,
        };
        s.check_spent();
        Ok(s)
    }

    /// The token to generate next in place of a sampled one, if the budget is spent.
    pub(crate) fn forced(&mut self) -> Option<u32> {
        self.forced.pop_front()
    }

    fn check_spent(&mut self) {
        if let Budgeting::Inside(used) = self.state
            && used >= self.budget.max_tokens
            && self.forced.is_empty()
        {
            self.forced.extend(self.close.iter().copied());
        }
    }

    /// Reads one generated token's text.
    pub(crate) fn observe(&mut self, text: &str) {
        match self.state {
            Budgeting::After => return,
            Budgeting::Before => {
                self.window.push_str(text);
                let t = self.window.trim_start();
                if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                    self.state = Budgeting::Inside(0);
                    self.window = rest.to_owned();
                } else if !t.is_empty() && !THINK_OPEN.starts_with(t) {
                    self.state = Budgeting::After;
                }
                self.check_spent();
                return;
            }
            Budgeting::Inside(used) => {
                self.window.push_str(text);
                if self.window.contains(THINK_CLOSE) {
                    self.state = Budgeting::After;
                    self.forced.clear();
                    return;
                }
                self.state = Budgeting::Inside(used + 1);
            }
        }
        // Keep only what could be the start of a marker split over tokens.
        let keep = self.window.len().saturating_sub(THINK_CLOSE.len());
        let cut = (keep..=self.window.len())
            .find(|&i| self.window.is_char_boundary(i))
            .unwrap_or(self.window.len());
        self.window.drain(..cut);
        self.check_spent();
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

    fn budget(max_tokens: usize, starts_inside: bool) -> BudgetState {
        let budget = ReasoningBudget::new(max_tokens, starts_inside);
        let mut s = BudgetState {
            budget,
            state: if starts_inside {
                Budgeting::Inside(0)
            } else {
                Budgeting::Before
            },
            window: String::new(),
            forced: std::collections::VecDeque::new(),
            close: vec![7, 8],
        };
        s.check_spent();
        s
    }

    #[test]
    fn a_budget_forces_the_close_once_spent_and_only_inside() {
        // Opened by the output after whitespace; three tokens allowed.
        let mut b = budget(3, false);
        for piece in ["\n", "<th", "ink>", "a", "b"] {
            b.observe(piece);
            assert_eq!(b.forced(), None, "{piece}");
        }
        b.observe("c");
        assert_eq!(
            (b.forced(), b.forced(), b.forced()),
            (Some(7), Some(8), None)
        );
        // The forced tokens' text closes the block; nothing more is forced.
        b.observe("</");
        b.observe("think>");
        b.observe("answer");
        assert_eq!(b.forced(), None);

        // A block the model closes itself within the budget: nothing forced.
        let mut b = budget(3, true);
        for piece in ["x", "</think", ">", "more", "text", "here"] {
            b.observe(piece);
            assert_eq!(b.forced(), None, "{piece}");
        }
        // An output that does not open a block has no budget to spend.
        let mut b = budget(1, false);
        for piece in ["Hello", "there", "<think>", "a", "b"] {
            b.observe(piece);
            assert_eq!(b.forced(), None, "{piece}");
        }
        // A zero budget inside the prompt's block closes it at once.
        let mut b = budget(0, true);
        assert_eq!(b.forced(), Some(7));
    }

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
