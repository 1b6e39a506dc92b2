//! A model ready to serve: decoder, tokenizer and chat template, loaded together.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cache::CacheWeight;
use crate::chat::{ChatOptions, ChatPrompt, ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use afo_quant::QuantPolicy;

use crate::model::{Model, WeightSource};
use crate::quantize::{QuantizeProgress, QuantizingSource, linear_weight_count};
use crate::tokenizer::Tokenizer;

/// A loaded model with everything needed to turn text into tokens and back.
#[derive(Debug)]
pub struct LoadedModel {
    id: String,
    path: PathBuf,
    model: Model,
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    load_ms: f64,
}

impl LoadedModel {
    /// Loads a GGUF model file: its decoder, its tokenizer and its chat template
    /// (ChatML when the file has none).
    ///
    /// # Errors
    /// Any error of opening the file, building the tokenizer, the template or the
    /// decoder.
    pub fn load_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let start = Instant::now();
        let path = path.as_ref().to_path_buf();
        let mut gguf = GgufFile::open(&path)?;
        let tokenizer = Tokenizer::from_gguf(gguf.content())?;
        let model = gguf.load_model()?;
        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        Self::assemble(path, id, model, tokenizer, start)
    }

    /// Puts the pieces together: the chat template comes from the tokenizer, the id
    /// from the file name (or the whole path).
    fn assemble(
        path: PathBuf,
        id: Option<String>,
        model: Model,
        tokenizer: Tokenizer,
        start: Instant,
    ) -> Result<Self> {
        let chat = ChatTemplate::from_tokenizer(&tokenizer)?;
        // The plain-text copy that client content is encoded with, made now so that
        // its bytes are part of the load.
        tokenizer.encode_plain("")?;
        // And the longest token, which bounds a prompt's bytes before it is encoded.
        tokenizer.max_token_bytes();
        Ok(Self {
            id: id.unwrap_or_else(|| path.display().to_string()),
            path,
            model,
            tokenizer,
            chat,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Loads a model from a path, choosing the format by what the path is.
    ///
    /// # Errors
    /// [`Error::Io`] for a missing path, [`Error::Gguf`] for a file that is not GGUF,
    /// and the loader's errors.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        if path.is_dir() {
            Self::load_hf_dir(path)
        } else {
            Self::load_gguf(path)
        }
    }

    /// Loads a Hugging Face model directory: `config.json`, the safetensors weights
    /// (read tensor by tensor; f32, f16 or bf16) and `tokenizer.json` with its configuration.
    ///
    /// # Errors
    /// Any error of reading the configuration, the weights or the tokenizer.
    pub fn load_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let start = Instant::now();
        let path = dir.as_ref().to_path_buf();
        let tokenizer = Tokenizer::from_hf_dir(&path)?;
        let model = crate::hf::SafetensorsDir::open(&path)?.load_model()?;
        let id = path.file_name().map(|s| s.to_string_lossy().into_owned());
        Self::assemble(path, id, model, tokenizer, start)
    }

    /// Loads a model (GGUF file or Hugging Face directory) and quantizes its weights
    /// by `policy` while loading, one weight at a time (see [`QuantizingSource`]);
    /// `progress` is called after each weight.
    ///
    /// # Errors
    /// As [`LoadedModel::load`], and [`afo_quant::Error::CannotQuantize`] (wrapped)
    /// naming a weight that does not fit the scheme.
    pub fn load_quantized(
        path: impl AsRef<Path>,
        policy: QuantPolicy,
        progress: impl FnMut(QuantizeProgress<'_>),
    ) -> Result<Self> {
        let start = Instant::now();
        let path = path.as_ref().to_path_buf();
        let quantize = |config: crate::config::ModelConfig,
                        source: &mut dyn WeightSource|
         -> Result<Model> {
            let total = linear_weight_count(config.num_layers, source.contains("output.weight"));
            let mut q = QuantizingSource::new(source, policy, total, progress);
            Model::load(config, &mut q)
        };
        if path.is_dir() {
            let tokenizer = Tokenizer::from_hf_dir(&path)?;
            let mut dir = crate::hf::SafetensorsDir::open(&path)?;
            let model = quantize(dir.config()?, &mut dir)?;
            let id = path.file_name().map(|s| s.to_string_lossy().into_owned());
            Self::assemble(path, id, model, tokenizer, start)
        } else {
            let mut gguf = GgufFile::open(&path)?;
            let tokenizer = Tokenizer::from_gguf(gguf.content())?;
            let model = quantize(gguf.config()?, &mut gguf)?;
            let id = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            Self::assemble(path, id, model, tokenizer, start)
        }
    }

    /// A short id (the file name without extension).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoder.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// How the decoder's KV caches hold keys and values: see
    /// [`Model::set_kv_format`].
    ///
    /// # Errors
    /// As [`Model::set_kv_format`].
    pub fn set_kv_format(&mut self, format: afo_kvcache::KvFormat) -> Result<()> {
        self.model.set_kv_format(format)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// How long loading took, in milliseconds.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Renders `messages` with the chat template (adding the assistant prompt) and
    /// encodes them, the messages' content as plain text ([`ChatTemplate::encode`]).
    ///
    /// # Errors
    /// Template and tokenizer errors.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.chat.encode(&self.tokenizer, messages, true, &[])
    }

    /// As [`LoadedModel::encode_chat`], with tools and `enable_thinking`
    /// ([`ChatTemplate::encode_chat`]).
    ///
    /// # Errors
    /// Template and tokenizer errors.
    pub fn encode_chat_with(
        &self,
        messages: &[Message],
        options: &ChatOptions,
    ) -> Result<ChatPrompt> {
        self.chat
            .encode_chat(&self.tokenizer, messages, options, &[])
    }

    /// Encodes plain text, adding BOS when the tokenizer asks for it.
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }
}

/// Bytes the tokenizer's tables take per vocabulary entry (the vocabulary, the merges,
/// the added tokens and their indexes), three times: the tokenizer, its plain-text copy
/// for client content ([`crate::Tokenizer::encode_plain`]), and the copy with the token
/// trie that constrained decoding builds on the first request with a grammar
/// ([`crate::Constraint`]), counted from the load so that the ledger holds it before it
/// exists. One copy measured on SmolLM2: 49,152 entries, about 15 MB resident beyond
/// the weights.
pub(crate) const TOKENIZER_BYTES_PER_ENTRY: u64 = 900;

impl CacheWeight for LoadedModel {
    /// The weights plus the tokenizer's tables.
    fn resident_bytes(&self) -> u64 {
        self.model.weight_bytes() + self.tokenizer.vocab_size() as u64 * TOKENIZER_BYTES_PER_ENTRY
    }
}
