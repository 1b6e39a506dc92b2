//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
///
/// Each variant names the thing and the place (a file, a tensor, a metadata key).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Saving a model failed.
    #[error("cannot save the model: {reason}")]
    Export {
        /// What went wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A model does not fit the model cache's memory budget, even after evicting
    /// every idle model.
    #[error(
        "model `{model}` needs {needed_bytes} bytes to load, and evicting every idle model does not make room: {refusal}"
    )]
    ModelTooLarge {
        /// The model's key in the cache.
        model: String,
        /// The bytes the model needs.
        needed_bytes: u64,
        /// The ledger's refusal, with its numbers.
        refusal: afo_guard::Refusal,
    },
    /// Another caller's load of the same model failed while this caller waited for it.
    #[error("loading model `{model}` failed: {reason}")]
    LoadFailed {
        /// The model's key in the cache.
        model: String,
        /// What the loading caller reported.
        reason: String,
    },
    /// A generation was asked for with no prompt tokens.
    #[error("the prompt is empty: generation needs at least one prompt token")]
    EmptyPrompt,
    /// A generation's constraint (JSON schema, grammar, regex) could not be compiled,
    /// or its grammar failed while the output was generated.
    #[error("{kind} constraint: {reason}")]
    Constraint {
        /// What kind of constraint: `JSON schema`, `JSON object`, `Lark grammar`,
        /// `regex`.
        kind: &'static str,
        /// llguidance's message.
        reason: String,
    },
    /// A tool definition or a tool-calling request is invalid.
    #[error("tool `{tool}`: {reason}")]
    Tool {
        /// The tool's name (empty when no tool is concerned).
        tool: String,
        /// What is wrong.
        reason: String,
    },
    /// A reasoning option is invalid.
    #[error("reasoning: {reason}")]
    Reasoning {
        /// What is wrong.
        reason: String,
    },
    /// A model file names an architecture the engine does not run.
    #[error("unsupported architecture `{name}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// The name found.
        name: String,
        /// The supported names.
        supported: String,
    },
    /// A model configuration is inconsistent.
    #[error("invalid model configuration: {reason}")]
    InvalidConfig {
        /// What does not fit.
        reason: String,
    },
    /// A GGUF metadata key is missing or has the wrong type.
    #[error("GGUF metadata `{key}`: {reason}")]
    GgufMetadata {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A model file is not a valid GGUF file.
    #[error("`{path}` is not a valid GGUF file: {reason}")]
    Gguf {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data lies outside the file.
    #[error(
        "tensor `{name}` in `{path}`: offset {offset} + {bytes} bytes is past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The file.
        path: std::path::PathBuf,
        /// The tensor.
        name: String,
        /// Where its data starts.
        offset: u64,
        /// Its size.
        bytes: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A tensor the architecture needs is missing.
    #[error("tensor `{name}` is missing from the model")]
    MissingTensor {
        /// The tensor.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor.
        name: String,
        /// The shape expected from the configuration.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// The fused attention kernel cannot read one of its inputs.
    #[error("attention: the {tensor} {reason}")]
    AttentionInput {
        /// Which input: `queries`, `keys`, `values` or `window`.
        tensor: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A linear layer failed.
    #[error(transparent)]
    Quant(#[from] afo_quant::Error),
    /// The KV cache refused an operation.
    #[error(transparent)]
    KvCache(#[from] afo_kvcache::Error),
    /// A safetensors file is corrupt or unsupported.
    #[error("`{path}` is not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file is larger than what is accepted for its kind (a configuration, a
    /// tokenizer, an index), so it is refused before it is read.
    #[error("`{path}` is too large: {bytes} bytes, the limit for this file is {limit} bytes")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (or the bytes read before the limit was passed).
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// `model.safetensors.index.json` names a shard outside the model folder.
    #[error("`{index}` names the shard `{shard}`, which {reason}")]
    ShardOutsideModel {
        /// The index file.
        index: PathBuf,
        /// The shard's name as written in the index.
        shard: String,
        /// Why it is refused.
        reason: String,
    },
    /// A model is not in the Hugging Face cache.
    #[error("model `{repo}` is not in the Hugging Face cache: {reason}")]
    ModelNotCached {
        /// The repository id.
        repo: String,
        /// What was looked for.
        reason: String,
    },
    /// Generation was cancelled by the caller.
    #[error("generation cancelled")]
    Cancelled,
    /// A GGUF `tokenizer.*` metadata key is missing or malformed.
    #[error("GGUF metadata `{key}`: {reason}")]
    TokenizerMetadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tokenizer setting names something this crate does not support.
    #[error("`{key}` = `{value}` is not supported (supported: {supported})")]
    UnsupportedTokenizer {
        /// The setting (a GGUF key).
        key: String,
        /// Its value.
        value: String,
        /// The supported values.
        supported: &'static str,
    },
    /// The `tokenizers` library failed.
    #[error("tokenizer: {context}: {source}")]
    Tokenizers {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `tokenizer_config.json` is malformed.
    #[error("tokenizer config `{path}`: {reason}")]
    TokenizerConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A JSON file could not be parsed.
    #[error("cannot parse JSON file `{path}`: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A chat template failed to compile or render.
    #[error("chat template `{name}`: {source:#}")]
    ChatTemplate {
        /// The template's name (`default`, `chatml` or a named template).
        name: String,
        /// The template engine's error, with its line.
        #[source]
        source: minijinja::Error,
    },
    /// A `tokenizer.json` that cannot be read.
    #[error("`{path}`: {reason}")]
    InvalidTokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A chat template ran past its bounds (instructions or output size).
    #[error("chat template `{name}`: {reason}")]
    ChatTemplateLimit {
        /// The template's name.
        name: String,
        /// Which bound, and by how much.
        reason: String,
    },
    /// A sampling parameter is out of range.
    #[error("sampling parameter `{name}` = {value}: {expected}")]
    InvalidSamplingParam {
        /// The parameter.
        name: &'static str,
        /// The rejected value.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },
    /// The logits handed to the sampler cannot be sampled from.
    #[error("sampler: {reason} ({vocab_size} logits)")]
    InvalidLogits {
        /// What is wrong.
        reason: String,
        /// The number of logits given.
        vocab_size: usize,
    },
    /// A stop string is invalid (empty).
    #[error("stop string {index} is empty")]
    EmptyStopString {
        /// Its position in the list.
        index: usize,
    },
    /// An embedding option is out of range.
    #[error("embedding option `{name}` = {value}: {expected}")]
    InvalidEmbedOption {
        /// The option.
        name: &'static str,
        /// The rejected value.
        value: String,
        /// The accepted range.
        expected: String,
    },
    /// An input to embed is longer than the model's context.
    #[error("the input has {tokens} tokens; the model's context holds at most {context}")]
    InputTooLong {
        /// The input's tokens.
        tokens: usize,
        /// The model's context, in tokens.
        context: usize,
    },
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
