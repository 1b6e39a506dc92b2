//! The afo inference engine.
//!
//! `afo-engine` owns model formats (GGUF, safetensors directories, the Hugging Face
//! cache layout), tokenizers and chat templates, the decoder forward passes, sampling,
//! generation and streaming, embeddings ([`embed()`]: pooled final hidden states), the
//! continuous-batching scheduler, the lazy model cache,
//! and the vision-language path ([`VisionLanguageModel`]: Qwen3-VL's encoder and its
//! M-RoPE / DeepStack decoder on the same forward pass, with [`TinyVlm`] writing a
//! seeded test checkpoint).

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

mod activation;
mod attention;
mod batch;
mod cache;
mod chat;
mod chat_output;
mod config;
mod constraint;
mod embed;
mod error;
mod eval;
mod generate;
mod gguf;
mod gguf_write;
mod hf;
mod hf_cache;
mod loaded;
mod logprobs;
mod model;
mod quantize;
mod reasoning;
mod sampler;
mod stream;
#[cfg(test)]
mod testing;
mod tokenizer;
mod tools;
mod vlm;

pub use batch::{
    AdmitFn, AdmitQuery, DEFAULT_PREFILL_CHUNK, RequestId, Scheduler, StepOutput, Ticket,
};
pub use cache::{Acquired, CacheStats, CacheWeight, LoadedEntry, ModelCache};
pub use chat::{CHATML_TEMPLATE, ChatOptions, ChatPrompt, ChatTemplate, Message};
pub use chat_output::{ChatEvent, ChatOutput, ChatOutputParser};
pub use config::{
    ARCHITECTURES, Architecture, ArchitectureInfo, ModelConfig, RopeScaling,
    supported_architectures,
};
pub use constraint::Constraint;
pub use embed::{EmbedOptions, Pooling, embed};
pub use error::{Error, Result};
pub use eval::{Agreement, Perplexity, compare_models, perplexity, streaming_perplexity};
pub use generate::{
    Decode, FinishReason, GenerateOptions, GenerateTimings, Generation, PREFILL_CHUNK, PrefixReuse,
    generate, generate_with_prefix,
};
pub use gguf::{GgufDescription, GgufFile, TypeCount};
pub use hf::{HfConfig, HfRopeScaling, SafetensorsDir, gguf_to_hf_name};
pub use hf_cache::{HfCache, model_file_in};
pub use loaded::LoadedModel;
pub use logprobs::{MAX_TOP_LOGPROBS, TokenLogprobs, token_logprobs};
pub use model::{Logits, Model, WeightSource};
pub use quantize::{
    AFO_QUANT_VERSION, QuantizeProgress, QuantizingSource, SaveReport, linear_weight_count,
    save_gguf,
};
pub use reasoning::{
    ReasoningBudget, ReasoningEvent, ReasoningParser, SplitOutput, THINK_CLOSE, THINK_OPEN,
    prompt_opens_reasoning,
};
pub use sampler::{Sampler, SamplingParams, SamplingParamsBuilder};
pub use stream::{StopMatcher, StopStep, StreamDecoder};
pub use tokenizer::{
    BpePreTokenizer, GgufTokenizerMetadata, GgufTokenizerModel, TokenType, Tokenizer,
};
pub use tools::{
    MAX_TOOL_NAME_LEN, ParsedOutput, ToolCall, ToolCallFormat, ToolCallParser, ToolChoice,
    ToolDefinition, ToolEvent, hermes_system_prompt, tool_call_grammar,
};
pub use vlm::{
    IMAGE_PLACEHOLDER, QWEN3_VL_NAMES, TinyVlm, VisionActivation, VisionConfig, VisionEncoder,
    VisionFileConfig, VisionInput, VisionLanguageModel, VlmConfig, VlmDecoder, VlmFileConfig,
    VlmPrompt, image_tokens,
};
