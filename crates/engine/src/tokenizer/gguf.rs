//! Building a tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! Two vocabulary kinds are supported, as llama.cpp names them in
//! `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE with explicit merges. The pre-tokenizer (how text is cut
//!   into words before BPE) is chosen by `tokenizer.ggml.pre`, see [`BpePreTokenizer`].
//! - `llama`: SentencePiece-style BPE. There are no merges in the file, only a score per
//!   token; merges are derived from the scores (a pair merges when the joined piece is in
//!   the vocabulary, higher score first), which is what llama.cpp's SPM tokenizer does.
//!   Spaces become `▁`, a `▁` is prepended to each run of text, and characters outside
//!   the vocabulary fall back to `<0xNN>` byte tokens.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::error::{Error, Result};

/// The GPT-2 word-splitting regex (also the one inside `tokenizers`' `ByteLevel`).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's regex (from its `tokenizer.json`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's regex (from its `tokenizer.json`): Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The type of one vocabulary entry, as stored in `tokenizer.ggml.token_type`
/// (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenType {
    /// 0, or a value this crate does not know.
    Undefined,
    /// 1: an ordinary piece of text.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<s>`, `<|im_start|>`): added as special, never split.
    Control,
    /// 4: a user-defined token: matched as a whole in the input text.
    UserDefined,
    /// 5: an unused slot.
    Unused,
    /// 6: a byte-fallback token `<0xNN>`.
    Byte,
}

impl TokenType {
    /// The type for a stored `tokenizer.ggml.token_type` value.
    pub fn from_code(code: i32) -> Self {
        match code {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// The vocabulary kind, from `tokenizer.ggml.model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgufTokenizerModel {
    /// `gpt2`: byte-level BPE with merges.
    Gpt2,
    /// `llama`: SentencePiece-style BPE with scores and byte fallback.
    Llama,
}

impl FromStr for GgufTokenizerModel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gpt2" => Ok(Self::Gpt2),
            "llama" => Ok(Self::Llama),
            other => Err(Error::UnsupportedTokenizer {
                key: "tokenizer.ggml.model".into(),
                value: other.into(),
                supported: "gpt2, llama",
            }),
        }
    }
}

impl fmt::Display for GgufTokenizerModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gpt2 => "gpt2",
            Self::Llama => "llama",
        })
    }
}

/// How a byte-level BPE vocabulary cuts text into words, from `tokenizer.ggml.pre`.
///
/// The regexes are llama.cpp's (`llm_tokenizer_bpe`), which in turn come from each
/// model's `tokenizer.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BpePreTokenizer {
    /// `default` (or no `pre` key): llama.cpp's fallback: punctuation runs, the GPT-2
    /// regex, number runs, then groups of three digits.
    Default,
    /// `gpt-2`, `mpt`, `olmo`, `jais`: the plain GPT-2 regex.
    Gpt2,
    /// `llama-bpe` (Llama 3), `dbrx`, `smaug-bpe`: Llama 3's regex (numbers in groups of
    /// up to three digits).
    Llama3,
    /// `qwen2`, `stablelm2`: Llama 3's regex with single digits.
    Qwen2,
    /// `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`,
    /// `minerva-7b`: every digit on its own, then the GPT-2 regex, no leading space
    /// added (the Hugging Face `Sequence[Digits(individual_digits), ByteLevel]`).
    SmolLm,
}

impl FromStr for BpePreTokenizer {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "default" => Self::Default,
            "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => Self::Gpt2,
            "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => Self::Llama3,
            "qwen2" | "stablelm2" => Self::Qwen2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::SmolLm,
            other => {
                return Err(Error::UnsupportedTokenizer {
                    key: "tokenizer.ggml.pre".into(),
                    value: other.into(),
                    supported: "default, gpt-2, mpt, olmo, jais, llama-bpe, dbrx, smaug-bpe, \
                                qwen2, stablelm2, smollm, starcoder, refact, command-r, \
                                codeshell, exaone, minerva-7b",
                });
            }
        })
    }
}

impl fmt::Display for BpePreTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::Gpt2 => "gpt-2",
            Self::Llama3 => "llama-bpe",
            Self::Qwen2 => "qwen2",
            Self::SmolLm => "smollm",
        })
    }
}

impl BpePreTokenizer {
    /// The regexes applied one after the other, each splitting the pieces of the
    /// previous one (matches and the text between them both become pieces).
    fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            Self::Gpt2 => &[GPT2_REGEX],
            Self::Llama3 => &[LLAMA3_REGEX],
            Self::Qwen2 => &[QWEN2_REGEX],
            Self::SmolLm => &[r"\p{N}", GPT2_REGEX],
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        let mut steps = Vec::with_capacity(4);
        for regex in self.regexes() {
            let split = Split::new(
                SplitPattern::Regex((*regex).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|source| Error::Tokenizers {
                context: format!("compiling the `{self}` pre-tokenizer regex `{regex}`"),
                source,
            })?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, false,
        )));
        Ok(PreTokenizerWrapper::Sequence(PreSequence::new(steps)))
    }
}

/// The `tokenizer.ggml.*` metadata of a GGUF file, as plain values.
///
/// This mirrors the file: everything llama.cpp may omit is an `Option`. Build it with
/// [`GgufTokenizerMetadata::from_gguf`] or fill it by hand (tests do).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufTokenizerMetadata {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer of a `gpt2` vocabulary.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: one score per token (`llama` vocabularies).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: one [`TokenType`] code per token.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs, highest priority first (`gpt2`).
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`: end of turn, also ends generation.
    pub eot_token_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`: end of message, also ends generation.
    pub eom_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (`llama` vocabularies; default true).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

fn meta_err(key: &str, reason: impl Into<String>) -> Error {
    Error::TokenizerMetadata {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn get_string(md: &HashMap<String, Value>, key: &str) -> Result<Option<String>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(meta_err(
            key,
            format!("expected a string, found {:?}", other.value_type()),
        )),
    }
}

fn get_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let n: i128 = match value {
        Value::U8(v) => (*v).into(),
        Value::I8(v) => (*v).into(),
        Value::U16(v) => (*v).into(),
        Value::I16(v) => (*v).into(),
        Value::U32(v) => (*v).into(),
        Value::I32(v) => (*v).into(),
        Value::U64(v) => (*v).into(),
        Value::I64(v) => (*v).into(),
        other => {
            return Err(meta_err(
                key,
                format!("expected an integer, found {:?}", other.value_type()),
            ));
        }
    };
    // llama.cpp writes -1 (as a signed or wrapped value) for "no such token".
    if n < 0 || n == i128::from(u32::MAX) {
        return Ok(None);
    }
    u32::try_from(n)
        .map(Some)
        .map_err(|_| meta_err(key, format!("token id {n} does not fit in 32 bits")))
}

fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(meta_err(
            key,
            format!("expected a bool, found {:?}", other.value_type()),
        )),
    }
}

fn get_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a [Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(meta_err(
            key,
            format!("expected an array, found {:?}", other.value_type()),
        )),
    }
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<String>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(meta_err(
                key,
                format!(
                    "item {i}: expected a string, found {:?}",
                    other.value_type()
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn f32_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<f32>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::F32(x) => Ok(*x),
            // Narrowing a stored f64 score to f32 is intended.
            #[allow(clippy::cast_possible_truncation)]
            Value::F64(x) => Ok(*x as f32),
            other => Err(meta_err(
                key,
                format!("item {i}: expected a float, found {:?}", other.value_type()),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn i32_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<i32>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::I32(x) => Ok(*x),
            Value::U32(x) => i32::try_from(*x)
                .map_err(|_| meta_err(key, format!("item {i}: {x} is out of range"))),
            Value::I8(x) => Ok((*x).into()),
            Value::U8(x) => Ok((*x).into()),
            Value::I16(x) => Ok((*x).into()),
            Value::U16(x) => Ok((*x).into()),
            other => Err(meta_err(
                key,
                format!(
                    "item {i}: expected an integer, found {:?}",
                    other.value_type()
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

impl GgufTokenizerMetadata {
    /// Reads the tokenizer metadata of a parsed GGUF file.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        Self::from_metadata(&content.metadata)
    }

    /// Reads the tokenizer metadata from a GGUF metadata map.
    ///
    /// Fails when `tokenizer.ggml.model` or `tokenizer.ggml.tokens` is missing, or when
    /// a key holds a value of the wrong type.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = get_string(md, "tokenizer.ggml.model")?
            .ok_or_else(|| meta_err("tokenizer.ggml.model", "missing"))?;
        let tokens = string_array(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| meta_err("tokenizer.ggml.tokens", "missing"))?;
        Ok(Self {
            model,
            pre: get_string(md, "tokenizer.ggml.pre")?,
            tokens,
            scores: f32_array(md, "tokenizer.ggml.scores")?,
            token_types: i32_array(md, "tokenizer.ggml.token_type")?,
            merges: string_array(md, "tokenizer.ggml.merges")?,
            bos_token_id: get_u32(md, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: get_u32(md, "tokenizer.ggml.eos_token_id")?,
            eot_token_id: get_u32(md, "tokenizer.ggml.eot_token_id")?,
            eom_token_id: get_u32(md, "tokenizer.ggml.eom_token_id")?,
            unknown_token_id: get_u32(md, "tokenizer.ggml.unknown_token_id")?,
            padding_token_id: get_u32(md, "tokenizer.ggml.padding_token_id")?,
            add_bos_token: get_bool(md, "tokenizer.ggml.add_bos_token")?,
            add_eos_token: get_bool(md, "tokenizer.ggml.add_eos_token")?,
            add_space_prefix: get_bool(md, "tokenizer.ggml.add_space_prefix")?,
            chat_template: get_string(md, "tokenizer.chat_template")?,
        })
    }

    fn token_type(&self, id: usize) -> TokenType {
        self.token_types
            .as_ref()
            .and_then(|t| t.get(id))
            .map_or(TokenType::Normal, |&c| TokenType::from_code(c))
    }

    fn check_id(&self, key: &str, id: Option<u32>) -> Result<Option<u32>> {
        match id {
            Some(i) if i as usize >= self.tokens.len() => Err(meta_err(
                key,
                format!(
                    "token id {i} is past the end of the vocabulary ({} tokens)",
                    self.tokens.len()
                ),
            )),
            other => Ok(other),
        }
    }
}

/// The longest token text accepted, in bytes: deriving merges from scores looks at
/// every split of every token, so one huge token would stall the load. The longest
/// tokens of released vocabularies are a few hundred bytes.
const MAX_TOKEN_BYTES: usize = 4096;

/// What [`build`] produces: the `tokenizers` pipeline and the resolved special ids.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) inner: tokenizers::Tokenizer,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) unk_id: Option<u32>,
    pub(crate) pad_id: Option<u32>,
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
}

/// Token texts that end a turn in common chat formats; llama.cpp treats a control token
/// with one of these texts as an end-of-generation token too.
pub(crate) const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// Builds the tokenizer described by `md`.
pub(crate) fn build(md: &GgufTokenizerMetadata) -> Result<Built> {
    let model: GgufTokenizerModel = md.model.parse()?;
    let n = md.tokens.len();
    if n == 0 {
        return Err(meta_err("tokenizer.ggml.tokens", "the vocabulary is empty"));
    }
    if u32::try_from(n).is_err() {
        return Err(meta_err("tokenizer.ggml.tokens", "more than 2^32 tokens"));
    }
    if let Some((id, text)) = md
        .tokens
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > MAX_TOKEN_BYTES)
    {
        return Err(meta_err(
            "tokenizer.ggml.tokens",
            format!(
                "token {id} is {} bytes long, past the limit of {MAX_TOKEN_BYTES}",
                text.len()
            ),
        ));
    }
    if let Some(types) = &md.token_types
        && types.len() != n
    {
        return Err(meta_err(
            "tokenizer.ggml.token_type",
            format!("{} entries for {n} tokens", types.len()),
        ));
    }

    let mut inner = match model {
        GgufTokenizerModel::Gpt2 => build_gpt2(md)?,
        GgufTokenizerModel::Llama => build_llama(md)?,
    };

    // Control tokens are special (never split, skippable on decode); user-defined
    // tokens are matched whole but decode as text.
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (id, text) in md.tokens.iter().enumerate() {
        // An empty token would match everywhere in the text.
        if text.is_empty() {
            continue;
        }
        match md.token_type(id) {
            TokenType::Control => {
                special.push(AddedToken::from(text.clone(), true).normalized(false));
            }
            TokenType::UserDefined => {
                user.push(AddedToken::from(text.clone(), false).normalized(false));
            }
            _ => {}
        }
    }
    inner.add_special_tokens(&special);
    inner.add_tokens(&user);

    let bos_id = md.check_id("tokenizer.ggml.bos_token_id", md.bos_token_id)?;
    let eos_id = md.check_id("tokenizer.ggml.eos_token_id", md.eos_token_id)?;
    let eot_id = md.check_id("tokenizer.ggml.eot_token_id", md.eot_token_id)?;
    let eom_id = md.check_id("tokenizer.ggml.eom_token_id", md.eom_token_id)?;
    let mut unk_id = md.check_id("tokenizer.ggml.unknown_token_id", md.unknown_token_id)?;
    let pad_id = md.check_id("tokenizer.ggml.padding_token_id", md.padding_token_id)?;
    if unk_id.is_none() {
        unk_id = (0..n)
            .find(|&i| md.token_type(i) == TokenType::Unknown)
            .and_then(|i| u32::try_from(i).ok());
    }

    let mut eos_ids: Vec<u32> = [eos_id, eot_id, eom_id].into_iter().flatten().collect();
    for (id, text) in md.tokens.iter().enumerate() {
        if md.token_type(id) == TokenType::Control
            && END_OF_GENERATION_TEXTS.contains(&text.as_str())
            && let Ok(id) = u32::try_from(id)
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
    }

    let default_add_bos = model == GgufTokenizerModel::Llama;
    Ok(Built {
        inner,
        bos_id,
        eos_ids,
        unk_id,
        pad_id,
        add_bos: md.add_bos_token.unwrap_or(default_add_bos) && bos_id.is_some(),
        add_eos: md.add_eos_token.unwrap_or(false) && eos_id.is_some(),
    })
}

fn vocab_map(md: &GgufTokenizerMetadata) -> Result<Vocab> {
    let mut vocab = Vocab::default();
    vocab.reserve(md.tokens.len());
    for (id, text) in md.tokens.iter().enumerate() {
        let id = u32::try_from(id)
            .map_err(|_| meta_err("tokenizer.ggml.tokens", "more than 2^32 tokens"))?;
        // A duplicated text keeps its first id, as llama.cpp's text-to-token map does.
        vocab.entry(text.clone()).or_insert(id);
    }
    Ok(vocab)
}

fn build_gpt2(md: &GgufTokenizerMetadata) -> Result<tokenizers::Tokenizer> {
    let pre: BpePreTokenizer = md.pre.as_deref().unwrap_or("default").parse()?;
    let vocab = vocab_map(md)?;
    let merge_lines = md.merges.as_ref().ok_or_else(|| {
        meta_err(
            "tokenizer.ggml.merges",
            "missing (needed by a gpt2 vocabulary)",
        )
    })?;
    let mut merges: Merges = Vec::with_capacity(merge_lines.len());
    for (i, line) in merge_lines.iter().enumerate() {
        let (left, right) = line.split_once(' ').ok_or_else(|| {
            meta_err(
                "tokenizer.ggml.merges",
                format!("merge {i} `{line}` is not two tokens separated by a space"),
            )
        })?;
        merges.push((left.to_owned(), right.to_owned()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|source| Error::Tokenizers {
            context: "building the byte-level BPE model from tokenizer.ggml.merges".into(),
            source,
        })?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre.build()?));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(tok)
}

/// Derives BPE merges from SentencePiece scores: every split of a normal token into two
/// pieces that are both in the vocabulary is a merge, ranked by the joined token's
/// score (highest first), ties by the joined token's id.
fn merges_from_scores(md: &GgufTokenizerMetadata, vocab: &Vocab, scores: &[f32]) -> Merges {
    let mut ranked: Vec<(f32, u32, usize, usize)> = Vec::new();
    for (id, text) in md.tokens.iter().enumerate() {
        if !matches!(
            md.token_type(id),
            TokenType::Normal | TokenType::UserDefined | TokenType::Undefined
        ) {
            continue;
        }
        let Ok(id32) = u32::try_from(id) else {
            continue;
        };
        if vocab.get(text) != Some(&id32) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (split, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((score, id32, id, split));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.3.cmp(&b.3)));
    ranked
        .into_iter()
        .filter_map(|(_, _, id, split)| {
            let text = md.tokens.get(id)?;
            let (left, right) = text.split_at(split);
            Some((left.to_owned(), right.to_owned()))
        })
        .collect()
}

fn build_llama(md: &GgufTokenizerMetadata) -> Result<tokenizers::Tokenizer> {
    let scores = md.scores.as_ref().ok_or_else(|| {
        meta_err(
            "tokenizer.ggml.scores",
            "missing (needed by a llama vocabulary)",
        )
    })?;
    if scores.len() != md.tokens.len() {
        return Err(meta_err(
            "tokenizer.ggml.scores",
            format!("{} scores for {} tokens", scores.len(), md.tokens.len()),
        ));
    }
    let vocab = vocab_map(md)?;
    let merges = merges_from_scores(md, &vocab, scores);
    let unk = md
        .unknown_token_id
        .and_then(|id| md.tokens.get(id as usize))
        .or_else(|| {
            (0..md.tokens.len())
                .find(|&i| md.token_type(i) == TokenType::Unknown)
                .and_then(|i| md.tokens.get(i))
        })
        .cloned();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|source| Error::Tokenizers {
        context: "building the SentencePiece BPE model from tokenizer.ggml.scores".into(),
        source,
    })?;

    let add_space_prefix = md.add_space_prefix.unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|source| Error::Tokenizers {
            context: format!("building the replacement of `{from}` by `{to}`"),
            source,
        })
    };
    let mut normalizers = Vec::with_capacity(2);
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    normalizers.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
    let mut decoders = vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }

    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
        normalizers,
    ))));
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(tok)
}
