//! Model architectures and the resolved model configuration.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;

use crate::error::{Error, Result};

/// A decoder architecture the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Architecture {
    /// Llama 2/3 and their derivatives (SmolLM2, TinyLlama, ...).
    Llama,
    /// Mistral (Llama layout, sliding-window attention).
    Mistral,
    /// Qwen2 / Qwen2.5 (bias on the q/k/v projections).
    Qwen2,
    /// Qwen3 (RMSNorm on each head of q and k).
    Qwen3,
}

/// What the engine knows of one architecture: its names in every format, and its
/// layer features. The single registry of architectures.
#[derive(Debug, Clone, Copy)]
pub struct ArchitectureInfo {
    /// The architecture.
    pub arch: Architecture,
    /// The canonical name.
    pub name: &'static str,
    /// `general.architecture` in GGUF files.
    pub gguf: &'static str,
    /// `model_type` values in Hugging Face `config.json`.
    pub hf_model_types: &'static [&'static str],
    /// `architectures` class names in Hugging Face `config.json`.
    pub hf_classes: &'static [&'static str],
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// RMSNorm on each head of q and k.
    pub qk_norm: bool,
    /// Whether GGUF conversion permuted q/k for interleaved RoPE (llama.cpp's
    /// `LLAMA_ROPE_TYPE_NORM`); otherwise GGUF keeps the NeoX layout of the checkpoint.
    pub gguf_rope_interleaved: bool,
}

/// The registry.
pub const ARCHITECTURES: &[ArchitectureInfo] = &[
    ArchitectureInfo {
        arch: Architecture::Llama,
        name: "llama",
        gguf: "llama",
        hf_model_types: &["llama"],
        hf_classes: &["LlamaForCausalLM"],
        qkv_bias: false,
        qk_norm: false,
        gguf_rope_interleaved: true,
    },
    ArchitectureInfo {
        arch: Architecture::Mistral,
        name: "mistral",
        gguf: "mistral",
        hf_model_types: &["mistral"],
        hf_classes: &["MistralForCausalLM"],
        qkv_bias: false,
        qk_norm: false,
        gguf_rope_interleaved: true,
    },
    ArchitectureInfo {
        arch: Architecture::Qwen2,
        name: "qwen2",
        gguf: "qwen2",
        hf_model_types: &["qwen2"],
        hf_classes: &["Qwen2ForCausalLM"],
        qkv_bias: true,
        qk_norm: false,
        gguf_rope_interleaved: false,
    },
    ArchitectureInfo {
        arch: Architecture::Qwen3,
        name: "qwen3",
        gguf: "qwen3",
        hf_model_types: &["qwen3"],
        hf_classes: &["Qwen3ForCausalLM"],
        qkv_bias: false,
        qk_norm: true,
        gguf_rope_interleaved: false,
    },
];

impl Architecture {
    /// The registry entry.
    pub fn info(self) -> &'static ArchitectureInfo {
        // Every variant has an entry; the fallback is never taken.
        ARCHITECTURES
            .iter()
            .find(|i| i.arch == self)
            .unwrap_or(&ARCHITECTURES[0])
    }

    /// The architecture of a GGUF `general.architecture` value.
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`] naming it and listing the supported ones.
    pub fn from_gguf(name: &str) -> Result<Self> {
        ARCHITECTURES
            .iter()
            .find(|i| i.gguf == name)
            .map(|i| i.arch)
            .ok_or_else(|| unsupported(name))
    }

    /// The architecture of a Hugging Face `model_type` or class name.
    ///
    /// # Errors
    /// [`Error::UnsupportedArchitecture`] naming it and listing the supported ones.
    pub fn from_hf(name: &str) -> Result<Self> {
        ARCHITECTURES
            .iter()
            .find(|i| i.hf_model_types.contains(&name) || i.hf_classes.contains(&name))
            .map(|i| i.arch)
            .ok_or_else(|| unsupported(name))
    }
}

/// The names of every supported architecture, for error messages.
pub fn supported_architectures() -> String {
    ARCHITECTURES
        .iter()
        .map(|i| i.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn unsupported(name: &str) -> Error {
    Error::UnsupportedArchitecture {
        name: name.to_owned(),
        supported: supported_architectures(),
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.info().name)
    }
}

impl FromStr for Architecture {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        ARCHITECTURES
            .iter()
            .find(|i| i.name == lower)
            .map(|i| i.arch)
            .ok_or_else(|| unsupported(s))
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3's scaling of long wavelengths.
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained at.
        original_max_position: usize,
    },
}

/// A model's configuration, resolved: every value known, nothing optional left.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP intermediate size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether q/k use the interleaved RoPE layout (GGUF Llama) rather than NeoX halves.
    pub rope_interleaved: bool,
    /// The longest context the model supports.
    pub max_position: usize,
    /// Whether the LM head is the token embedding.
    pub tie_embeddings: bool,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// RMSNorm on q and k heads.
    pub qk_norm: bool,
    /// Sliding-window attention: a position sees itself and the `window - 1` before
    /// it (Mistral). `None`: full causal attention.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Checks that the sizes fit together.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the inconsistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("heads, kv heads and layers must be at least 1".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("vocab, hidden and intermediate sizes must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 tokens sees nothing".into());
        }
        Ok(())
    }

    /// Builds the configuration from GGUF metadata (`<arch>.*` keys).
    ///
    /// # Errors
    /// [`Error::GgufMetadata`] naming a missing or mistyped key,
    /// [`Error::UnsupportedArchitecture`], [`Error::InvalidConfig`].
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let arch_name = meta_str(md, "general.architecture")?;
        let arch = Architecture::from_gguf(&arch_name)?;
        let info = arch.info();
        let key = |k: &str| format!("{arch_name}.{k}");
        let num = |k: &str| meta_f64(md, &key(k)).map(|v| v as usize);
        let hidden_size = num("embedding_length")?;
        let num_heads = num("attention.head_count")?;
        let num_kv_heads = meta_f64(md, &key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(num_heads);
        let head_dim = meta_f64(md, &key("attention.key_length"))
            .map(|v| v as usize)
            .or_else(|_| meta_f64(md, &key("rope.dimension_count")).map(|v| v as usize))
            .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let vocab_size = match meta_f64(md, &key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => match md.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => {
                    return Err(Error::GgufMetadata {
                        key: key("vocab_size"),
                        reason: "missing, and no tokenizer.ggml.tokens to count".into(),
                    });
                }
            },
        };
        let rope_scaling = match meta_str(md, &key("rope.scaling.type")).ok().as_deref() {
            Some("llama3") => RopeScaling::Llama3 {
                factor: meta_f64(md, &key("rope.scaling.factor"))?,
                low_freq_factor: meta_f64(md, &key("rope.scaling.low_freq_factor")).unwrap_or(1.0),
                high_freq_factor: meta_f64(md, &key("rope.scaling.high_freq_factor"))
                    .unwrap_or(4.0),
                original_max_position: meta_f64(md, &key("rope.scaling.original_context_length"))?
                    as usize,
            },
            _ => RopeScaling::None,
        };
        let config = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: num("feed_forward_length")?,
            num_layers: num("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: meta_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: meta_f64(md, &key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: info.gguf_rope_interleaved,
            max_position: meta_f64(md, &key("context_length"))
                .map(|v| v as usize)
                .unwrap_or(4096),
            tie_embeddings: true,
            qkv_bias: info.qkv_bias,
            qk_norm: info.qk_norm,
            sliding_window: meta_f64(md, &key("attention.sliding_window"))
                .ok()
                .map(|v| v as usize),
        };
        config.validate()?;
        Ok(config)
    }
}

/// A GGUF metadata value as a number, whatever its integer or float type.
pub(crate) fn meta_f64(md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    let v = md.get(key).ok_or_else(|| Error::GgufMetadata {
        key: key.to_owned(),
        reason: "missing".into(),
    })?;
    Ok(match v {
        Value::U8(x) => f64::from(*x),
        Value::I8(x) => f64::from(*x),
        Value::U16(x) => f64::from(*x),
        Value::I16(x) => f64::from(*x),
        Value::U32(x) => f64::from(*x),
        Value::I32(x) => f64::from(*x),
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => f64::from(*x),
        Value::F64(x) => *x,
        other => {
            return Err(Error::GgufMetadata {
                key: key.to_owned(),
                reason: format!("expected a number, found {:?}", other.value_type()),
            });
        }
    })
}

/// A GGUF metadata value as a string.
pub(crate) fn meta_str(md: &HashMap<String, Value>, key: &str) -> Result<String> {
    match md.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::GgufMetadata {
            key: key.to_owned(),
            reason: format!("expected a string, found {:?}", other.value_type()),
        }),
        None => Err(Error::GgufMetadata {
            key: key.to_owned(),
            reason: "missing".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_round_trip() {
        for info in ARCHITECTURES {
            assert_eq!(info.name.parse::<Architecture>().unwrap(), info.arch);
            assert_eq!(Architecture::from_gguf(info.gguf).unwrap(), info.arch);
            for class in info.hf_classes {
                assert_eq!(Architecture::from_hf(class).unwrap(), info.arch);
            }
            assert_eq!(info.arch.to_string(), info.name);
        }
        let err = Architecture::from_gguf("mamba").unwrap_err().to_string();
        assert!(err.contains("mamba") && err.contains("qwen3"), "{err}");
    }

    #[test]
    fn config_from_metadata() {
        let mut md = HashMap::new();
        md.insert("general.architecture".into(), Value::String("qwen3".into()));
        md.insert("qwen3.embedding_length".into(), Value::U32(64));
        md.insert("qwen3.feed_forward_length".into(), Value::U32(128));
        md.insert("qwen3.block_count".into(), Value::U32(2));
        md.insert("qwen3.attention.head_count".into(), Value::U32(4));
        md.insert("qwen3.attention.head_count_kv".into(), Value::U32(2));
        md.insert("qwen3.attention.key_length".into(), Value::U32(32));
        md.insert("qwen3.vocab_size".into(), Value::U64(100));
        let c = ModelConfig::from_gguf_metadata(&md).unwrap();
        assert_eq!(
            (c.arch, c.head_dim, c.num_kv_heads),
            (Architecture::Qwen3, 32, 2)
        );
        assert!(c.qk_norm && !c.rope_interleaved);
        md.remove("qwen3.block_count");
        let err = ModelConfig::from_gguf_metadata(&md)
            .unwrap_err()
            .to_string();
        assert!(err.contains("qwen3.block_count"), "{err}");
    }
}
