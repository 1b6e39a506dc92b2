//! Tokenizers: from GGUF metadata or from Hugging Face `tokenizer.json` files.
//!
//! [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] together with what generation needs
//! beside it: the BOS id, every id that ends generation, whether BOS/EOS are added to a
//! prompt, and the model's chat template.

mod gguf;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use serde_json::Value as Json;

pub use gguf::{BpePreTokenizer, GgufTokenizerMetadata, GgufTokenizerModel, TokenType};

use crate::error::{Error, Result};
use crate::hf::{
    CONFIG_JSON_LIMIT, TOKENIZER_CONFIG_LIMIT, TOKENIZER_JSON_LIMIT, read_bounded,
    read_json_bounded,
};

/// A tokenizer with its special-token configuration.
///
/// Build one with [`Tokenizer::from_gguf`], [`Tokenizer::from_gguf_metadata`],
/// [`Tokenizer::from_hf_files`] or [`Tokenizer::from_hf_dir`].
///
/// [`Tokenizer::encode`] recognises the vocabulary's special tokens (`<|im_start|>`)
/// in the input text and keeps them whole; [`Tokenizer::encode_plain`] reads them as
/// text.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// True when BOS/EOS are added by this wrapper (GGUF), false when the inner
    /// tokenizer's post-processor adds them (`tokenizer.json`).
    add_specials_here: bool,
    chat_template: Option<String>,
    named_chat_templates: BTreeMap<String, String>,
    /// A copy of `inner` that reads special-token text as plain text (for content a
    /// client wrote), made on first use.
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// The most bytes one token decodes to, found on first use.
    max_token_bytes: std::sync::OnceLock<usize>,
    /// The vocabulary's token trie for constrained decoding, built on first use.
    constraint_env: crate::constraint::ConstraintEnvCell,
}

impl Tokenizer {
    /// Builds the tokenizer stored in a parsed GGUF file's metadata.
    ///
    /// # Errors
    /// When `tokenizer.ggml.*` keys are missing or malformed, or the vocabulary kind or
    /// pre-tokenizer is not supported.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        Self::from_gguf_metadata(&GgufTokenizerMetadata::from_gguf(content)?)
    }

    /// Builds a tokenizer from GGUF tokenizer metadata given as plain values.
    ///
    /// # Errors
    /// As [`Tokenizer::from_gguf`].
    pub fn from_gguf_metadata(md: &GgufTokenizerMetadata) -> Result<Self> {
        let built = gguf::build(md)?;
        Ok(Self {
            inner: built.inner,
            bos_id: built.bos_id,
            eos_ids: built.eos_ids,
            unk_id: built.unk_id,
            pad_id: built.pad_id,
            add_bos: built.add_bos,
            add_eos: built.add_eos,
            add_specials_here: true,
            chat_template: md.chat_template.clone(),
            named_chat_templates: BTreeMap::new(),
            plain: std::sync::OnceLock::new(),
            max_token_bytes: std::sync::OnceLock::new(),
            constraint_env: Default::default(),
        })
    }

    /// Builds a tokenizer from a Hugging Face `tokenizer.json`, and optionally its
    /// `tokenizer_config.json` (chat template, BOS/EOS/PAD/UNK tokens, `add_bos_token`,
    /// `add_eos_token`).
    ///
    /// BOS and EOS are added by the `tokenizer.json` post-processor, as in `transformers`.
    ///
    /// # Errors
    /// When a file cannot be read or parsed, or names a special token that is not in
    /// the vocabulary; [`Error::FileTooLarge`] for a `tokenizer.json` over 64 MiB or a
    /// `tokenizer_config.json` over 16 MiB (checked before reading).
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let bytes = read_bounded(tokenizer_json, TOKENIZER_JSON_LIMIT)?;
        let inner = parse_tokenizer_json(tokenizer_json, &bytes)?;
        let config = match tokenizer_config {
            Some(path) => Some((path, read_json(path, TOKENIZER_CONFIG_LIMIT)?)),
            None => None,
        };
        let mut tok = Self {
            inner,
            bos_id: None,
            eos_ids: Vec::new(),
            unk_id: None,
            pad_id: None,
            add_bos: false,
            add_eos: false,
            add_specials_here: false,
            chat_template: None,
            named_chat_templates: BTreeMap::new(),
            plain: std::sync::OnceLock::new(),
            max_token_bytes: std::sync::OnceLock::new(),
            constraint_env: Default::default(),
        };
        if let Some((path, config)) = &config {
            tok.apply_hf_config(path, config)?;
        }
        tok.add_end_of_turn_tokens();
        Ok(tok)
    }

    /// Builds a tokenizer from a Hugging Face model directory: `tokenizer.json`, and
    /// when present `tokenizer_config.json`, `chat_template.jinja` (which takes
    /// precedence over the config's template) and `generation_config.json` (its
    /// `eos_token_id`, one id or a list, adds end-of-generation ids).
    ///
    /// # Errors
    /// As [`Tokenizer::from_hf_files`].
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("tokenizer_config.json");
        let config = config.is_file().then_some(config);
        let mut tok = Self::from_hf_files(&dir.join("tokenizer.json"), config.as_deref())?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let bytes = read_bounded(&jinja, CONFIG_JSON_LIMIT)?;
            let source = String::from_utf8(bytes).map_err(|e| Error::Io {
                path: jinja.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
            tok.chat_template = Some(source);
        }
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let json = read_json(&generation, CONFIG_JSON_LIMIT)?;
            let ids: Vec<u32> = match json.get("eos_token_id") {
                Some(Json::Number(n)) => n.as_u64().into_iter().collect::<Vec<_>>(),
                Some(Json::Array(items)) => items.iter().filter_map(Json::as_u64).collect(),
                _ => Vec::new(),
            }
            .into_iter()
            .filter_map(|id| u32::try_from(id).ok())
            .collect();
            for id in ids {
                if !tok.eos_ids.contains(&id) {
                    tok.eos_ids.push(id);
                }
            }
            if tok.bos_id.is_none() {
                tok.bos_id = json
                    .get("bos_token_id")
                    .and_then(Json::as_u64)
                    .and_then(|id| u32::try_from(id).ok());
            }
        }
        Ok(tok)
    }

    fn apply_hf_config(&mut self, path: &Path, config: &Json) -> Result<()> {
        let token_id = |key: &str| -> Result<Option<u32>> {
            let text = match config.get(key) {
                Some(Json::String(s)) => s.as_str(),
                Some(Json::Object(obj)) => match obj.get("content") {
                    Some(Json::String(s)) => s.as_str(),
                    _ => return Ok(None),
                },
                _ => return Ok(None),
            };
            self.inner
                .token_to_id(text)
                .map(Some)
                .ok_or_else(|| Error::TokenizerConfig {
                    path: path.to_path_buf(),
                    reason: format!("`{key}` is `{text}`, which is not in the vocabulary"),
                })
        };
        self.bos_id = token_id("bos_token")?;
        if let Some(eos) = token_id("eos_token")? {
            self.eos_ids.push(eos);
        }
        self.unk_id = token_id("unk_token")?;
        self.pad_id = token_id("pad_token")?;
        self.add_bos = config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        self.add_eos = config
            .get("add_eos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        match config.get("chat_template") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => self.chat_template = Some(s.clone()),
            Some(Json::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let (Some(name), Some(template)) = (
                        item.get("name").and_then(Json::as_str),
                        item.get("template").and_then(Json::as_str),
                    ) else {
                        return Err(Error::TokenizerConfig {
                            path: path.to_path_buf(),
                            reason: format!(
                                "`chat_template` item {i} lacks a `name` or `template` string"
                            ),
                        });
                    };
                    self.named_chat_templates
                        .insert(name.to_owned(), template.to_owned());
                }
                self.chat_template = self.named_chat_templates.get("default").cloned();
            }
            Some(_) => {
                return Err(Error::TokenizerConfig {
                    path: path.to_path_buf(),
                    reason: "`chat_template` is neither a string nor a list of named templates"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// Adds the special tokens that end a turn in common chat formats to the EOS ids.
    fn add_end_of_turn_tokens(&mut self) {
        for text in gguf::END_OF_GENERATION_TEXTS {
            if let Some(id) = self.inner.token_to_id(text)
                && self.inner.get_added_vocabulary().is_special_token(text)
                && !self.eos_ids.contains(&id)
            {
                self.eos_ids.push(id);
            }
        }
    }

    /// The first special token (a control token such as `<|im_start|>`) written in
    /// `text`, if any.
    pub(crate) fn find_special_token(&self, text: &str) -> Option<String> {
        self.inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .find(|c| text.contains(c.as_str()))
    }

    /// Encodes `text` into token ids.
    ///
    /// With `add_special`, BOS and EOS are added as the model asks
    /// ([`Tokenizer::add_bos_token`], [`Tokenizer::add_eos_token`], or the
    /// `tokenizer.json` post-processor).
    ///
    /// # Errors
    /// When the underlying tokenizer fails (an unknown character with no unknown token).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special && !self.add_specials_here)
            .map_err(|source| Error::Tokenizers {
                context: format!("encoding {} bytes of text", text.len()),
                source,
            })?;
        let ids = encoding.get_ids();
        if !(add_special && self.add_specials_here) {
            return Ok(ids.to_vec());
        }
        let mut out = Vec::with_capacity(ids.len() + 2);
        if self.add_bos
            && let Some(bos) = self.bos_id
        {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        if self.add_eos
            && let Some(&eos) = self.eos_ids.first()
        {
            out.push(eos);
        }
        Ok(out)
    }

    /// Encodes `text` as plain text: special-token markers in it (`<|im_start|>`,
    /// `<|endoftext|>`) are tokenized as the characters they are, never as control
    /// tokens. For text a client wrote (a chat message's content), so that it cannot
    /// forge a turn; no BOS or EOS is added.
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut plain = self.inner.clone();
            plain.set_encode_special_tokens(true);
            plain
        });
        let encoding = plain
            .encode_fast(text, false)
            .map_err(|source| Error::Tokenizers {
                context: format!("encoding {} bytes of text", text.len()),
                source,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The most bytes of text one token stands for (the longest vocabulary entry,
    /// decoded). A text of `n` bytes encodes to at least `n / max_token_bytes`
    /// tokens, so a prompt too long for a context can be refused before it is
    /// tokenized. Computed on first use (one pass over the vocabulary).
    pub fn max_token_bytes(&self) -> usize {
        *self.max_token_bytes.get_or_init(|| {
            let n = u32::try_from(self.vocab_size()).unwrap_or(u32::MAX);
            (0..n)
                .filter_map(|id| self.inner.decode(&[id], false).ok())
                .map(|t| t.len())
                .max()
                .unwrap_or(1)
                .max(1)
        })
    }

    /// Decodes token ids into text; `skip_special` leaves out special tokens.
    ///
    /// Bytes that do not form complete UTF-8 characters decode to U+FFFD; use a
    /// [`StreamDecoder`](crate::StreamDecoder) to decode a stream token by token.
    ///
    /// # Errors
    /// When the underlying decoder fails.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|source| Error::Tokenizers {
                context: format!("decoding {} tokens", ids.len()),
                source,
            })
    }

    /// The text of token `id` as stored in the vocabulary (byte-level or `▁` form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry given in its stored form.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends generation: the EOS id first, then end-of-turn tokens
    /// (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// The unknown-token id, if the model has one.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// The padding id, if the model has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether BOS is put before a prompt encoded with `add_special`.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// Whether EOS is put after a prompt encoded with `add_special`.
    pub fn add_eos_token(&self) -> bool {
        self.add_eos
    }

    /// The text of the BOS token, for chat templates.
    pub fn bos_token(&self) -> Option<String> {
        self.bos_id.and_then(|id| self.inner.id_to_token(id))
    }

    /// The text of the EOS token (the first of [`Tokenizer::eos_ids`]), for chat
    /// templates.
    pub fn eos_token(&self) -> Option<String> {
        self.eos_ids
            .first()
            .and_then(|&id| self.inner.id_to_token(id))
    }

    /// The model's default chat template source, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A named chat template (`tool_use`, `rag`) from `tokenizer_config.json`.
    pub fn chat_template_named(&self, name: &str) -> Option<&str> {
        self.named_chat_templates.get(name).map(String::as_str)
    }

    /// The token trie and grammar compiler of this vocabulary for constrained
    /// decoding ([`crate::Constraint`]), built on first use and kept (an error, too).
    pub(crate) fn constraint_env(
        &self,
    ) -> std::result::Result<std::sync::Arc<crate::constraint::ConstraintEnv>, String> {
        self.constraint_env.get_or_build(self)
    }

    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Reads a JSON file of at most `limit` bytes.
/// Parses a `tokenizer.json`: first as JSON (a clear error for a truncated or
/// corrupt file), then by the `tokenizers` crate, whose deserializer panics on some
/// malformed values (an `expect` in its decoder's); such a panic becomes an error.
fn parse_tokenizer_json(path: &Path, bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    let bad = |reason: String| Error::InvalidTokenizer {
        path: path.to_path_buf(),
        reason,
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
        .map_err(|_| bad("the tokenizers crate could not read it (it panicked)".into()))?;
    parsed.map_err(|source| Error::Tokenizers {
        context: format!("parsing `{}`", path.display()),
        source,
    })
}

fn read_json(path: &Path, limit: u64) -> Result<Json> {
    read_json_bounded(path, limit)
}
