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

/// The most decoder layers a configuration may declare (the largest released models
/// have a few hundred).
pub(crate) const MAX_LAYERS: usize = 1 << 12;
/// The largest hidden size.
pub(crate) const MAX_HIDDEN_SIZE: usize = 1 << 17;
/// The largest MLP intermediate size.
pub(crate) const MAX_INTERMEDIATE_SIZE: usize = 1 << 20;
/// The most query (or key/value) heads.
pub(crate) const MAX_HEADS: usize = 1 << 12;
/// The largest dimension of one head.
pub(crate) const MAX_HEAD_DIM: usize = 1 << 12;
/// The widest attention: heads x head dimension.
pub(crate) const MAX_ATTENTION_WIDTH: usize = 1 << 18;
/// The largest vocabulary.
pub(crate) const MAX_VOCAB_SIZE: usize = 1 << 24;
/// The longest context a configuration may declare.
pub(crate) const MAX_POSITION: usize = 1 << 24;

impl ModelConfig {
    /// Checks that the sizes fit together and lie within bounds, so that nothing is
    /// allocated from a hostile configuration: every size at least 1 and at most
    /// 4096 layers, a hidden size of 2^17, an intermediate size of 2^20, 4096 heads
    /// (and kv heads) with a head dimension of at most 4096 and heads x head
    /// dimension at most 2^18, a vocabulary of 2^24 and a context of 2^24 tokens;
    /// heads a multiple of key/value heads; an even head dimension; a positive,
    /// finite RMSNorm epsilon below 1; a positive, finite RoPE base; Llama 3 scaling
    /// factors positive and finite, the high-frequency one above the low.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the inconsistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        let bounds = [
            ("vocab size", self.vocab_size, MAX_VOCAB_SIZE),
            ("hidden size", self.hidden_size, MAX_HIDDEN_SIZE),
            (
                "intermediate size",
                self.intermediate_size,
                MAX_INTERMEDIATE_SIZE,
            ),
            ("layer count", self.num_layers, MAX_LAYERS),
            ("head count", self.num_heads, MAX_HEADS),
            ("kv head count", self.num_kv_heads, MAX_HEADS),
            ("head dim", self.head_dim, MAX_HEAD_DIM),
            ("context length", self.max_position, MAX_POSITION),
        ];
        for (what, value, max) in bounds {
            if value > max {
                return bad(format!("{what} {value} is past the limit of {max}"));
            }
        }
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
        match self.num_heads.checked_mul(self.head_dim) {
            Some(w) if w <= MAX_ATTENTION_WIDTH => {}
            _ => {
                return bad(format!(
                    "{} heads x head dim {} is past the limit of {MAX_ATTENTION_WIDTH}",
                    self.num_heads, self.head_dim
                ));
            }
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad("vocab, hidden and intermediate sizes must be positive".into());
        }
        if self.max_position == 0 {
            return bad("the context length must be at least 1".into());
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 tokens sees nothing".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!(
                "RMSNorm epsilon {:?} must be positive, finite and below 1",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "RoPE base {:?} must be positive and finite",
                self.rope_theta
            ));
        }
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } = self.rope_scaling
        {
            let positive = |x: f64| x.is_finite() && x > 0.0;
            if !positive(factor) || !positive(low_freq_factor) || !positive(high_freq_factor) {
                return bad(format!(
                    "RoPE scaling factors (factor {factor:?}, low {low_freq_factor:?}, high \
                     {high_freq_factor:?}) must be positive and finite"
                ));
            }
            if high_freq_factor <= low_freq_factor {
                return bad(format!(
                    "RoPE scaling: the high-frequency factor {high_freq_factor:?} must be \
                     above the low-frequency factor {low_freq_factor:?}"
                ));
            }
            if original_max_position == 0 || original_max_position > MAX_POSITION {
                return bad(format!(
                    "RoPE scaling: original context length {original_max_position} must be \
                     between 1 and {MAX_POSITION}"
                ));
            }
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
        let num = |k: &str| meta_usize(md, &key(k));
        // An optional key: absent is `None`, present but malformed an error.
        let opt = |k: &str| -> Result<Option<usize>> {
            if md.contains_key(&key(k)) {
                num(k).map(Some)
            } else {
                Ok(None)
            }
        };
        let hidden_size = num("embedding_length")?;
        let num_heads = num("attention.head_count")?;
        let num_kv_heads = opt("attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => match opt("rope.dimension_count")? {
                Some(d) => d,
                None => derived_head_dim(hidden_size, num_heads, &key("embedding_length"))?,
            },
        };
        let vocab_size = match opt("vocab_size")? {
            Some(v) => v,
            None => match md.get("tokenizer.ggml.tokens") {
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
                original_max_position: num("rope.scaling.original_context_length")?,
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
            max_position: opt("context_length")?.unwrap_or(4096),
            tie_embeddings: true,
            qkv_bias: info.qkv_bias,
            qk_norm: info.qk_norm,
            sliding_window: opt("attention.sliding_window")?,
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

/// A GGUF metadata value as a size: a non-negative integer (stored as any integer
/// type, or as a float with no fraction).
pub(crate) fn meta_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = md.get(key).ok_or_else(|| Error::GgufMetadata {
        key: key.to_owned(),
        reason: "missing".into(),
    })?;
    let n: Option<i128> = match v {
        Value::U8(x) => Some((*x).into()),
        Value::I8(x) => Some((*x).into()),
        Value::U16(x) => Some((*x).into()),
        Value::I16(x) => Some((*x).into()),
        Value::U32(x) => Some((*x).into()),
        Value::I32(x) => Some((*x).into()),
        Value::U64(x) => Some((*x).into()),
        Value::I64(x) => Some((*x).into()),
        Value::F32(x) => float_integer(f64::from(*x)),
        Value::F64(x) => float_integer(*x),
        other => {
            return Err(Error::GgufMetadata {
                key: key.to_owned(),
                reason: format!("expected a number, found {:?}", other.value_type()),
            });
        }
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::GgufMetadata {
            key: key.to_owned(),
            reason: format!("expected a non-negative integer, found {v:?}"),
        })
}

/// A float that holds an integer, as one.
fn float_integer(x: f64) -> Option<i128> {
    // The bound keeps the conversion exact-or-refused rather than saturating.
    (x.is_finite() && x.fract() == 0.0 && x.abs() < 1e30).then_some(x as i128)
}

/// `hidden / heads` when the head dimension is not given: the hidden size must then
/// divide into the heads.
pub(crate) fn derived_head_dim(hidden: usize, heads: usize, hidden_key: &str) -> Result<usize> {
    if heads == 0 {
        return Err(Error::InvalidConfig {
            reason: "heads, kv heads and layers must be at least 1".into(),
        });
    }
    if !hidden.is_multiple_of(heads) {
        return Err(Error::InvalidConfig {
            reason: format!(
                "`{hidden_key}` {hidden} is not a multiple of the {heads} attention heads, \
                 and no head dimension is given"
            ),
        });
    }
    Ok(hidden / heads)
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
