//! Constrained decoding: a grammar decides which tokens may come next.
//!
//! See [`Constraint`]: what it means, how generation follows it, and its cost.

use std::sync::{Arc, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{
    ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What a generation's output must be: text that matches a JSON schema
/// ([`Constraint::json_schema`]), any JSON object ([`Constraint::json_object`]), a
/// context-free grammar in llguidance's Lark dialect ([`Constraint::lark`]), or a
/// regular expression ([`Constraint::regex`]).
///
/// Put one in
/// [`GenerateOptions::constraint`](crate::GenerateOptions::constraint) and both
/// [`generate`](crate::generate) and the batching [`Scheduler`](crate::Scheduler)
/// follow it: before each token is sampled, every token that cannot continue the
/// output is masked out of the logits (set to `-inf`), the sampled token advances the
/// grammar, end-of-sequence is allowed only where the grammar may end, and the
/// generation ends ([`FinishReason::Eos`](crate::FinishReason::Eos)) as soon as the
/// grammar is complete and nothing more may follow. Only `max_tokens`, a stop string
/// or cancellation end it earlier, and then the output may be incomplete.
///
/// The masks come from [llguidance](https://github.com/guidance-ai/llguidance) (the
/// library behind the structured outputs of llama.cpp and mistral.rs) over a token
/// trie of the model's own vocabulary. The trie and llguidance's parser factory are
/// built once per [`Tokenizer`], on the first constrained generation, and kept with it;
/// each generation compiles its grammar and walks it token by token.
///
/// The mask for the next token is computed while the model's forward pass for the
/// current one runs (on a helper thread), so on a machine with a spare core the
/// grammar costs little more than applying the mask; see `docs/benchmarks.md` for the
/// figures on SmolLM2.
///
/// ## JSON output
///
/// JSON is generated compactly on one line, with `", "` between items and `": "`
/// after keys and no other whitespace, so a small model cannot wander into endless
/// newlines. A schema may override this (and other llguidance options) with its own
/// `"x-guidance"` object. Object properties come out in the schema's order; the
/// schema keywords llguidance supports are listed in its documentation (`type`,
/// `properties`, `required`, `additionalProperties`, `enum`, `const`, `items`,
/// `prefixItems`, `minItems`/`maxItems`, `minLength`/`maxLength`, `pattern`,
/// `format`, `minimum`/`maximum`, `anyOf`/`oneOf`/`allOf`, `$ref`/`$defs`, ...); a
/// keyword it cannot enforce is an error, not silently ignored.
///
/// ## Example
///
/// ```no_run
/// use afo_engine::{Constraint, GenerateOptions, LoadedModel, SamplingParams};
/// # fn main() -> afo_engine::Result<()> {
/// let loaded = LoadedModel::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let schema = serde_json::json!({
///     "type": "object",
///     "properties": {
///         "name": {"type": "string", "maxLength": 20},
///         "mood": {"enum": ["happy", "sad"]}
///     },
///     "required": ["name", "mood"]
/// });
/// let options = GenerateOptions {
///     max_tokens: 64,
///     sampling: SamplingParams::greedy(),
///     constraint: Some(Constraint::json_schema(schema)),
///     ..GenerateOptions::default()
/// };
/// # let _ = (loaded, options);
/// # Ok(())
/// # }
/// ```
///
/// [`Constraint::check`] compiles a constraint without a model; every generation that
/// uses it compiles it against the model's vocabulary.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Constraint {
    /// Text that parses as JSON and validates against this JSON schema.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// Text in the language of this grammar, in llguidance's Lark dialect: rules and
    /// regex terminals as in Lark, plus `%json { schema }` for a JSON value inside the
    /// grammar and `<|special|>` / `<[id]>` for special tokens of the vocabulary.
    Lark(String),
    /// Text that matches this regular expression (the `regex` crate's syntax) in
    /// full.
    Regex(String),
}

impl Constraint {
    /// Output that validates against `schema` (a JSON Schema document).
    pub fn json_schema(schema: Value) -> Self {
        Self::JsonSchema(schema)
    }

    /// Output that is one JSON object, of any content.
    pub fn json_object() -> Self {
        Self::JsonObject
    }

    /// Output in the language of a Lark grammar (llguidance's dialect; the start rule
    /// is `start`).
    pub fn lark(grammar: impl Into<String>) -> Self {
        Self::Lark(grammar.into())
    }

    /// Output that matches `pattern` in full.
    pub fn regex(pattern: impl Into<String>) -> Self {
        Self::Regex(pattern.into())
    }

    /// What kind of constraint this is, for messages: `JSON schema`, `JSON object`,
    /// `Lark grammar` or `regex`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "JSON schema",
            Self::JsonObject => "JSON object",
            Self::Lark(_) => "Lark grammar",
            Self::Regex(_) => "regex",
        }
    }

    /// Compiles the constraint without a model: its syntax, and for a JSON schema
    /// that llguidance can enforce it and that it can be satisfied. What depends on
    /// a vocabulary (special tokens named in a Lark grammar) is checked when a
    /// generation starts.
    ///
    /// # Errors
    /// [`Error::Constraint`] with llguidance's message.
    pub fn check(&self) -> Result<()> {
        static BYTES: OnceLock<std::result::Result<ParserFactory, String>> = OnceLock::new();
        let factory = BYTES
            .get_or_init(|| factory(&ApproximateTokEnv::single_byte_env()))
            .as_ref()
            .map_err(|reason| self.error(reason.clone()))?;
        factory
            .create_parser(self.grammar()?)
            .map(drop)
            .map_err(|e| self.error(e.to_string()))
    }

    /// Compiles the constraint against `tokenizer`'s vocabulary into the state one
    /// sequence walks.
    ///
    /// # Errors
    /// [`Error::Constraint`] with llguidance's message.
    pub(crate) fn start(&self, tokenizer: &Tokenizer) -> Result<SeqConstraint> {
        let env = tokenizer
            .constraint_env()
            .map_err(|reason| self.error(reason))?;
        let parser = env
            .factory
            .create_parser(self.grammar()?)
            .map_err(|e| self.error(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(self.error(e));
        }
        for warning in matcher.grammar_warnings() {
            tracing::warn!(kind = self.kind(), %warning, "constraint");
        }
        Ok(SeqConstraint {
            matcher,
            mask: None,
            kind: self.kind(),
        })
    }

    fn error(&self, reason: String) -> Error {
        Error::Constraint {
            kind: self.kind(),
            reason,
        }
    }

    /// The llguidance grammar of the constraint.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Self::JsonSchema(schema) => TopLevelGrammar::from_json_schema(json_options(schema)?),
            Self::JsonObject => TopLevelGrammar::from_json_schema(json_options(&json!({
                "type": "object"
            }))?),
            Self::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
            Self::Regex(pattern) => TopLevelGrammar::from_regex(pattern),
        })
    }
}

/// A schema with afo's JSON layout (see [`Constraint`]) unless it sets its own
/// `x-guidance` options.
fn json_options(schema: &Value) -> Result<Value> {
    let mut schema = match schema {
        // `true` accepts any value; `false` none (llguidance says so).
        Value::Bool(true) => json!({}),
        Value::Object(_) | Value::Bool(false) => schema.clone(),
        other => {
            return Err(Error::Constraint {
                kind: "JSON schema",
                reason: format!(
                    "a schema is a JSON object (or true/false), not {}",
                    json_type(other)
                ),
            });
        }
    };
    if let Value::Object(map) = &mut schema
        && !map.contains_key("x-guidance")
    {
        map.insert(
            "x-guidance".into(),
            json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    Ok(schema)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// llguidance's parser factory over `env`, quiet (warnings go to `tracing`), with
/// short error messages.
fn factory(env: &TokEnv) -> std::result::Result<ParserFactory, String> {
    let mut f = ParserFactory::new_simple(env).map_err(|e| e.to_string())?;
    f.quiet();
    *f.limits_mut() = ParserLimits {
        verbose_errors: false,
        ..ParserLimits::default()
    };
    Ok(f)
}

/// What constrained decoding keeps per tokenizer: the token trie of its vocabulary
/// and llguidance's parser factory over it. Built once, on first use, by
/// [`Tokenizer::constraint_env`].
pub(crate) struct ConstraintEnv {
    factory: ParserFactory,
}

impl std::fmt::Debug for ConstraintEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintEnv")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .finish_non_exhaustive()
    }
}

/// The slot a [`Tokenizer`] keeps its [`ConstraintEnv`] in (the outcome of the one
/// build, an error included).
#[derive(Debug, Clone, Default)]
pub(crate) struct ConstraintEnvCell(OnceLock<std::result::Result<Arc<ConstraintEnv>, String>>);

impl ConstraintEnvCell {
    /// The environment of `tokenizer`, built on first use.
    pub(crate) fn get_or_build(
        &self,
        tokenizer: &Tokenizer,
    ) -> std::result::Result<Arc<ConstraintEnv>, String> {
        self.0
            .get_or_init(|| {
                let start = std::time::Instant::now();
                let env: TokEnv = Arc::new(VocabEnv::new(tokenizer)?);
                let factory = factory(&env)?;
                tracing::debug!(
                    vocab = tokenizer.vocab_size(),
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    "built the constraint token trie"
                );
                Ok(Arc::new(ConstraintEnv { factory }))
            })
            .clone()
    }
}

/// One sequence's constraint: llguidance's matcher and the mask for the next token.
pub(crate) struct SeqConstraint {
    matcher: Matcher,
    /// The allowed tokens for the next position, when computed ahead.
    mask: Option<SimpleVob>,
    kind: &'static str,
}

impl std::fmt::Debug for SeqConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqConstraint")
            .field("kind", &self.kind)
            .field("mask_ready", &self.mask.is_some())
            .finish_non_exhaustive()
    }
}

impl SeqConstraint {
    fn error(&self, reason: impl Into<String>) -> Error {
        Error::Constraint {
            kind: self.kind,
            reason: reason.into(),
        }
    }

    /// Computes the mask for the next token now, unless it is ready. Safe to run on
    /// another thread while the forward pass runs.
    ///
    /// # Errors
    /// When the grammar fails (llguidance's message).
    pub(crate) fn prepare(&mut self) -> Result<()> {
        if self.mask.is_none() {
            let mask = self
                .matcher
                .compute_mask()
                .map_err(|e| self.error(e.to_string()))?;
            self.mask = Some(mask);
        }
        Ok(())
    }

    /// Sets every logit that the grammar does not allow next to `-inf` (ids past the
    /// vocabulary too), computing the mask first when it is not ready.
    ///
    /// # Errors
    /// When the grammar fails, or allows no token at all.
    pub(crate) fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        self.prepare()?;
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        if mask.is_zero() {
            return Err(self.error(
                "no token of the vocabulary can continue the output here (the grammar needs text the vocabulary cannot spell)",
            ));
        }
        let mut chunks = logits.chunks_mut(32);
        for (&word, chunk) in mask.as_slice().iter().zip(&mut chunks) {
            match word {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                w => {
                    for (bit, l) in chunk.iter_mut().enumerate() {
                        if w & (1 << bit) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        for chunk in chunks {
            chunk.fill(f32::NEG_INFINITY);
        }
        Ok(())
    }

    /// Advances the grammar by the sampled `token`. Returns whether the grammar is
    /// complete and nothing may follow (the generation ends).
    ///
    /// # Errors
    /// When the grammar does not allow `token`.
    pub(crate) fn commit(&mut self, token: u32) -> Result<bool> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| self.error(format!("token {token} was not allowed: {e}")))?;
        Ok(self.matcher.is_stopped())
    }
}

/// Computes the next masks of `constraints` while `work` runs on this thread (the
/// forward pass): on a helper thread when there is a mask to compute, else inline.
///
/// # Errors
/// `work`'s error first, then the first mask's.
pub(crate) fn overlap<T>(
    constraints: Vec<&mut SeqConstraint>,
    work: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if constraints.is_empty() {
        return work();
    }
    std::thread::scope(|s| {
        let helper = s.spawn(move || constraints.into_iter().try_for_each(SeqConstraint::prepare));
        let out = work();
        let masks = helper.join().unwrap_or_else(|_| {
            Err(Error::Constraint {
                kind: "grammar",
                reason: "the mask computation panicked".into(),
            })
        });
        let out = out?;
        masks?;
        Ok(out)
    })
}

/// A [`Tokenizer`]'s vocabulary as llguidance sees it: every token's bytes in a
/// trie (special tokens under llguidance's marker byte), its end-of-sequence ids, and
/// a copy of the `tokenizers` pipeline that tokenizes a fragment as it stands (no
/// prefix space added) for the grammar's literal strings.
struct VocabEnv {
    trie: TokTrie,
    fragments: tokenizers::Tokenizer,
}

impl VocabEnv {
    fn new(tokenizer: &Tokenizer) -> std::result::Result<Self, String> {
        let mut hf = tokenizer.inner().clone();
        if let Some(n) = hf.get_normalizer().cloned() {
            hf.with_normalizer(without_prepend(n));
        }
        if let Some(p) = hf.get_pre_tokenizer().cloned() {
            hf.with_pre_tokenizer(Some(metaspace_never(p)));
        }
        let vocab = u32::try_from(tokenizer.vocab_size())
            .map_err(|_| "the vocabulary has more than 2^32 tokens".to_string())?;
        let words = token_bytes(&hf, vocab)?;
        let eos = tokenizer.eos_ids();
        let mut info = TokRxInfo::new(vocab, eos.first().copied().unwrap_or(u32::MAX));
        info.tok_bos = tokenizer.bos_id();
        info.tok_unk = tokenizer.unk_id();
        info.tok_pad = tokenizer.pad_id();
        let mut trie = TokTrie::from(&info, &words);
        let eos: Vec<u32> = eos.iter().copied().filter(|&id| id < vocab).collect();
        if !eos.is_empty() {
            trie = trie.with_eos_tokens(&eos);
        }
        Ok(Self {
            trie,
            fragments: hf,
        })
    }
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            match self.fragments.encode_fast(s, false) {
                Ok(e) => e.get_ids().to_vec(),
                // Never expected for valid UTF-8; the trie's greedy split is still
                // a valid (if not canonical) tokenization.
                Err(_) => self.trie.greedy_tokenize(s.as_bytes()),
            }
        })
    }

    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.trie
                .tokenize_with_special(s, |s| match self.fragments.encode_fast(s, false) {
                    Ok(e) => e.get_ids().to_vec(),
                    Err(_) => self.trie.greedy_tokenize(s.as_bytes()),
                })
        })
    }
}

/// The normalizer without `Prepend` steps (SentencePiece's leading `▁`), which would
/// make a fragment tokenize differently from inside a text.
fn without_prepend(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
    match n {
        NormalizerWrapper::Prepend(_) => None,
        NormalizerWrapper::Sequence(seq) => {
            let kept: Vec<_> = seq
                .as_ref()
                .iter()
                .filter_map(|n| without_prepend(n.clone()))
                .collect();
            (!kept.is_empty())
                .then(|| NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(kept)))
        }
        other => Some(other),
    }
}

/// The pre-tokenizer with Metaspace never adding a leading `▁`.
fn metaspace_never(p: PreTokenizerWrapper) -> PreTokenizerWrapper {
    match p {
        PreTokenizerWrapper::Metaspace(mut m) => {
            m.prepend_scheme = tokenizers::pre_tokenizers::metaspace::PrependScheme::Never;
            PreTokenizerWrapper::Metaspace(m)
        }
        PreTokenizerWrapper::Sequence(seq) => {
            PreTokenizerWrapper::Sequence(tokenizers::pre_tokenizers::sequence::Sequence::new(
                seq.as_ref().iter().cloned().map(metaspace_never).collect(),
            ))
        }
        other => other,
    }
}

/// How a vocabulary stores bytes: byte-level BPE (GPT-2's byte-to-character map) or
/// SentencePiece with byte fallback (`<0x0A>` tokens, `▁` for a space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    ByteLevel,
    ByteFallback { space: char },
}

fn spelling(decoder: Option<&DecoderWrapper>) -> Option<Spelling> {
    fn walk(d: &DecoderWrapper, level: &mut bool, fallback: &mut bool, space: &mut char) {
        match d {
            DecoderWrapper::ByteLevel(_) => *level = true,
            DecoderWrapper::ByteFallback(_) => *fallback = true,
            DecoderWrapper::Metaspace(m) => *space = m.get_replacement(),
            DecoderWrapper::Replace(r) if r.content == " " => {
                // The pattern is private: read it back from the serialized form.
                if let Ok(v) = serde_json::to_value(r)
                    && let Some(s) = v["pattern"]["String"].as_str()
                    && let [c] = s.chars().collect::<Vec<_>>()[..]
                {
                    *space = c;
                }
            }
            DecoderWrapper::Sequence(seq) => {
                for d in seq.get_decoders() {
                    walk(d, level, fallback, space);
                }
            }
            _ => {}
        }
    }
    let (mut level, mut fallback, mut space) = (false, false, '▁');
    walk(decoder?, &mut level, &mut fallback, &mut space);
    if level {
        Some(Spelling::ByteLevel)
    } else if fallback {
        Some(Spelling::ByteFallback { space })
    } else {
        None
    }
}

/// GPT-2's map from the characters of a byte-level vocabulary back to bytes.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        if printable(b) {
            map.insert(char::from(b), b);
        } else {
            if let Some(c) = char::from_u32(next) {
                map.insert(c, b);
            }
            next += 1;
        }
    }
    map
}

/// Every token's bytes: special added tokens (and added tokens written `<...>`)
/// under llguidance's marker byte, so that grammars never spell them by accident.
fn token_bytes(
    hf: &tokenizers::Tokenizer,
    vocab: u32,
) -> std::result::Result<Vec<Vec<u8>>, String> {
    let spelling = spelling(hf.get_decoder()).ok_or_else(|| {
        "the tokenizer's decoder is neither byte-level BPE nor SentencePiece with byte fallback, so token bytes are unknown".to_string()
    })?;
    let chars = byte_level_chars();
    let mut words = vec![Vec::new(); vocab as usize];
    // Ids whose bytes come from the added tokens, not from the model's pieces.
    let mut added_ids = vec![false; vocab as usize];
    for (id, added) in hf.get_added_tokens_decoder() {
        let Some(slot) = words.get_mut(id as usize) else {
            continue;
        };
        if added.special || (added.content.starts_with('<') && added.content.ends_with('>')) {
            let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            bytes.extend_from_slice(added.content.as_bytes());
            *slot = bytes;
        } else {
            *slot = added.content.clone().into_bytes();
        }
        added_ids[id as usize] = true;
    }
    for id in 0..vocab {
        if added_ids[id as usize] {
            continue;
        }
        let Some(piece) = hf.id_to_token(id) else {
            continue;
        };
        let bytes = match spelling {
            Spelling::ByteLevel => piece.chars().map(|c| chars.get(&c).copied()).collect(),
            Spelling::ByteFallback { space } => Some(
                match piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(byte) => vec![byte],
                    None => piece.replace(space, " ").into_bytes(),
                },
            ),
        };
        // A piece outside the byte map cannot be produced by the grammar: left empty,
        // it is never allowed.
        if let Some(bytes) = bytes {
            words[id as usize] = bytes;
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_is_gpt2s() {
        let m = byte_level_chars();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
    }

    #[test]
    fn check_reports_bad_constraints() {
        assert!(
            Constraint::json_schema(json!({"type": "object"}))
                .check()
                .is_ok()
        );
        assert!(Constraint::regex("[a-z]+").check().is_ok());
        assert!(Constraint::lark("start: \"yes\" | \"no\"").check().is_ok());
        let e = Constraint::json_schema(json!({"type": "no-such-type"}))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("JSON schema"), "{e}");
        let e = Constraint::json_schema(json!([1, 2])).check().unwrap_err();
        assert!(e.to_string().contains("not an array"), "{e}");
        let e = Constraint::lark("start: undefined_rule")
            .check()
            .unwrap_err();
        assert!(e.to_string().starts_with("Lark grammar constraint"), "{e}");
        let e = Constraint::regex("(unclosed").check().unwrap_err();
        assert!(e.to_string().starts_with("regex constraint"), "{e}");
    }
}
