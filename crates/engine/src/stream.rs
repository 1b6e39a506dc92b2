//! Streaming output: token ids to text deltas, and stop strings.
//!
//! [`StreamDecoder`] turns generated ids into text deltas that never split a UTF-8
//! character. Byte-level BPE and SentencePiece byte fallback can end a token in the
//! middle of a character; the decoder holds those bytes back until the character is
//! complete. It decodes incrementally with the prefix-offset technique of
//! text-generation-inference: each step decodes only a short window of recent ids
//! (the ids of the previous delta plus the new ones) and emits the difference, so the
//! cost per token does not grow with the output.
//!
//! It also holds back a trailing grapheme cluster that the next token could still
//! extend: when the text ends in a non-ASCII character (an emoji that a skin tone or
//! a zero-width joiner may follow, a regional-indicator half of a flag, a Hangul jamo,
//! a combining mark), the last grapheme cluster waits for the next delta. ASCII
//! endings are emitted at once (a combining mark after an ASCII letter is then
//! emitted on its own, in the next delta).
//!
//! [`StopMatcher`] cuts the text at the first stop string, which may span any number
//! of deltas: it holds back text that could be the start of a stop string, and emits
//! nothing after a match.

use unicode_segmentation::UnicodeSegmentation;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// How many prompt ids seed the decoding window, so that the first generated token
/// decodes with its leading space.
const PROMPT_CONTEXT: usize = 5;
/// Drop decoded ids from the window's buffer once this many are behind it.
const COMPACT_AFTER: usize = 256;

/// Incremental detokenizer: token ids in, UTF-8-safe text deltas out.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
    hold_graphemes: bool,
    held: String,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder for a fresh sequence; `skip_special` leaves special tokens out.
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
            hold_graphemes: true,
            held: String::new(),
        }
    }

    /// A decoder for the continuation of `prompt`: the last few prompt ids seed the
    /// window, so that the first token's leading space (SentencePiece `▁`) survives.
    pub fn with_prompt(tokenizer: &'a Tokenizer, prompt: &[u32], skip_special: bool) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..];
        let mut decoder = Self::new(tokenizer, skip_special);
        decoder.ids.extend_from_slice(context);
        decoder.read_offset = context.len();
        decoder
    }

    /// Whether to hold back a trailing grapheme cluster that the next token could
    /// extend (see the module docs). Default true.
    pub fn hold_graphemes(mut self, yes: bool) -> Self {
        self.hold_graphemes = yes;
        self
    }

    /// Adds one generated id and returns the text that is now safe to show (often
    /// empty while a character or cluster is incomplete).
    ///
    /// # Errors
    /// When the tokenizer fails to decode.
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let window = self.ids.get(self.prefix_offset..).unwrap_or_default();
        let read = self.read_offset - self.prefix_offset;
        let prefix_text = self
            .tokenizer
            .decode(window.get(..read).unwrap_or_default(), self.skip_special)?;
        let new_text = self.tokenizer.decode(window, self.skip_special)?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            self.held.push_str(suffix_after(&new_text, &prefix_text));
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.compact();
        }
        Ok(self.take_emittable())
    }

    /// Ends the stream: returns everything still held, incomplete bytes included (as
    /// U+FFFD).
    ///
    /// # Errors
    /// When the tokenizer fails to decode.
    pub fn finish(&mut self) -> Result<String> {
        let window = self.ids.get(self.prefix_offset..).unwrap_or_default();
        let read = self.read_offset - self.prefix_offset;
        if window.len() > read {
            let prefix_text = self
                .tokenizer
                .decode(window.get(..read).unwrap_or_default(), self.skip_special)?;
            let new_text = self.tokenizer.decode(window, self.skip_special)?;
            self.held.push_str(suffix_after(&new_text, &prefix_text));
        }
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.compact();
        Ok(std::mem::take(&mut self.held))
    }

    fn compact(&mut self) {
        if self.prefix_offset >= COMPACT_AFTER {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }

    fn take_emittable(&mut self) -> String {
        let last = self.held.chars().next_back();
        let hold = self.hold_graphemes && last.is_some_and(|c| !c.is_ascii());
        if !hold {
            return std::mem::take(&mut self.held);
        }
        let cut = self
            .held
            .grapheme_indices(true)
            .next_back()
            .map_or(0, |(i, _)| i);
        let rest = self.held.split_off(cut);
        std::mem::replace(&mut self.held, rest)
    }
}

/// The part of `new` after `prefix`; when a decoder changed the shared part, the part
/// after their longest common prefix.
fn suffix_after<'t>(new: &'t str, prefix: &str) -> &'t str {
    if let Some(rest) = new.strip_prefix(prefix) {
        return rest;
    }
    let common = new
        .char_indices()
        .zip(prefix.chars())
        .find(|((_, a), b)| a != b)
        .map_or_else(|| new.len().min(prefix.len()), |((i, _), _)| i);
    new.get(common..).unwrap_or_default()
}

/// The result of [`StopMatcher::push`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text safe to emit now.
    pub text: String,
    /// The index (into [`StopMatcher::stops`]) of the stop string that matched; the
    /// text before it is in [`StopStep::text`] and generation should end.
    pub stop: Option<usize>,
}

/// Finds stop strings in streamed text.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// A matcher for the given stop strings (none is fine: text passes through).
    ///
    /// # Errors
    /// [`Error::EmptyStopString`] for an empty stop string.
    pub fn new<I, S>(stops: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(Error::EmptyStopString { index });
        }
        Ok(Self {
            stops,
            held: String::new(),
            stopped: None,
        })
    }

    /// The stop strings.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// The index of the stop string that matched, once one has.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Feeds a text delta. Returns the text that can be shown: everything up to the
    /// first stop string, minus a tail that could still become one. After a match,
    /// returns nothing.
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped.is_some() {
            return StopStep::default();
        }
        self.held.push_str(delta);
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, index)) = first {
            self.held.truncate(pos);
            self.stopped = Some(index);
            return StopStep {
                text: std::mem::take(&mut self.held),
                stop: Some(index),
            };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest.saturating_sub(1));
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = self.held.get(i..).unwrap_or_default();
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let tail = self.held.split_off(keep_from);
        StopStep {
            text: std::mem::replace(&mut self.held, tail),
            stop: None,
        }
    }

    /// Ends the stream without a stop: returns the held-back tail.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
