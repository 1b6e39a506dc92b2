//! Which scheme each weight of a model is stored in.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;

use crate::scheme::QuantScheme;

/// What a weight matrix does in a decoder, as far as quantization cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TensorRole {
    /// The token embedding (also the LM head when the two are tied).
    Embedding,
    /// An untied LM head.
    Head,
    /// The attention projections (q, k, v, output).
    Attention,
    /// The MLP projections (gate, up, down).
    Mlp,
}

impl TensorRole {
    /// The role of a weight by its GGUF name (`token_embd.weight`, `output.weight`,
    /// `blk.N.attn_q.weight`, `blk.N.ffn_up.weight`, ...); `None` for anything else.
    pub fn of_gguf_name(name: &str) -> Option<Self> {
        let base = name.strip_suffix(".weight")?;
        match base {
            "token_embd" => return Some(TensorRole::Embedding),
            "output" => return Some(TensorRole::Head),
            _ => {}
        }
        let rest = base.strip_prefix("blk.")?;
        let (_, part) = rest.split_once('.')?;
        match part {
            "attn_q" | "attn_k" | "attn_v" | "attn_output" => Some(TensorRole::Attention),
            "ffn_gate" | "ffn_up" | "ffn_down" => Some(TensorRole::Mlp),
            _ => None,
        }
    }
}

impl fmt::Display for TensorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorRole::Embedding => "embedding",
            TensorRole::Head => "head",
            TensorRole::Attention => "attention",
            TensorRole::Mlp => "mlp",
        })
    }
}

impl FromStr for TensorRole {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "embedding" | "embeddings" => Ok(TensorRole::Embedding),
            "head" | "lm_head" => Ok(TensorRole::Head),
            "attention" | "attn" => Ok(TensorRole::Attention),
            "mlp" | "ffn" => Ok(TensorRole::Mlp),
            _ => Err(Error::UnknownScheme(format!("tensor role `{s}`"))),
        }
    }
}

/// The scheme per [`TensorRole`].
///
/// [`QuantPolicy::new`] is the default: attention and MLP in the scheme asked for, the
/// embedding and the head at least as precise (int8 for 4-bit bodies, Q8_0 for int8
/// ones, f16 for GGML 8-bit ones, the same for dense ones), since they see every token
/// and are where a coarse grid costs most quality. Q8_0 edges for an int8 body were
/// chosen on the measured quality, size and speed (docs/benchmarks.md): within 1% of
/// f32's perplexity with the file under 30% of f32's, the tied head (the largest
/// matrix) read at about half the bytes of f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantPolicy {
    /// Attention projections.
    pub attention: QuantScheme,
    /// MLP projections.
    pub mlp: QuantScheme,
    /// The token embedding (and the tied head).
    pub embedding: QuantScheme,
    /// An untied head.
    pub head: QuantScheme,
}

impl QuantPolicy {
    /// The default policy for a body scheme (see the type's docs).
    pub fn new(body: QuantScheme) -> Self {
        let edges = Self::more_precise_than(body);
        Self {
            attention: body,
            mlp: body,
            embedding: edges,
            head: edges,
        }
    }

    /// Every weight in one scheme.
    pub fn uniform(scheme: QuantScheme) -> Self {
        Self {
            attention: scheme,
            mlp: scheme,
            embedding: scheme,
            head: scheme,
        }
    }

    /// Sets the scheme of the embedding and the head.
    pub fn with_edges(mut self, scheme: QuantScheme) -> Self {
        self.embedding = scheme;
        self.head = scheme;
        self
    }

    /// The scheme for a role.
    pub fn scheme_for(&self, role: TensorRole) -> QuantScheme {
        match role {
            TensorRole::Embedding => self.embedding,
            TensorRole::Head => self.head,
            TensorRole::Attention => self.attention,
            TensorRole::Mlp => self.mlp,
        }
    }

    fn more_precise_than(body: QuantScheme) -> QuantScheme {
        if body.is_dense() {
            body
        } else if body == QuantScheme::INT8 {
            // An int8 body takes Q8_0 edges: on SmolLM2 (GPL-3, ctx 512, 14 windows)
            // perplexity is +0.72% of f32 with Q8_0 edges (the file 25.7% of f32's),
            // against +1.12% with int8 ones (25.4%) and +0.72% with f16 ones (30.6%),
            // and decode as fast as with int8 edges (the head runs the GGML kernels);
            // docs/benchmarks.md has the figures.
            QuantScheme::Ggml(GgmlDType::Q8_0)
        } else if body.bits_per_weight() < 8.0 {
            QuantScheme::INT8
        } else {
            QuantScheme::F16
        }
    }
}

impl fmt::Display for QuantPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attention {}, mlp {}, embedding {}, head {}",
            self.attention, self.mlp, self.embedding, self.head
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_gguf_names() {
        assert_eq!(
            TensorRole::of_gguf_name("token_embd.weight"),
            Some(TensorRole::Embedding)
        );
        assert_eq!(
            TensorRole::of_gguf_name("output.weight"),
            Some(TensorRole::Head)
        );
        assert_eq!(
            TensorRole::of_gguf_name("blk.12.attn_v.weight"),
            Some(TensorRole::Attention)
        );
        assert_eq!(
            TensorRole::of_gguf_name("blk.0.ffn_down.weight"),
            Some(TensorRole::Mlp)
        );
        assert_eq!(TensorRole::of_gguf_name("blk.0.attn_norm.weight"), None);
        assert_eq!(TensorRole::of_gguf_name("output_norm.weight"), None);
    }

    #[test]
    fn edges_are_kept_more_precise_by_default() {
        let int4: QuantScheme = "int4-g32".parse().unwrap();
        let p = QuantPolicy::new(int4);
        assert_eq!(p.scheme_for(TensorRole::Mlp), int4);
        assert_eq!(p.scheme_for(TensorRole::Embedding), QuantScheme::INT8);
        let p = QuantPolicy::new(QuantScheme::INT8);
        assert_eq!(p.scheme_for(TensorRole::Mlp), QuantScheme::INT8);
        assert_eq!(
            p.scheme_for(TensorRole::Head),
            QuantScheme::Ggml(GgmlDType::Q8_0)
        );
        let q8 = QuantPolicy::new("q8_0".parse().unwrap());
        assert_eq!(q8.scheme_for(TensorRole::Embedding), QuantScheme::F16);
        let p = p.with_edges(QuantScheme::F16);
        assert_eq!(p.scheme_for(TensorRole::Embedding), QuantScheme::F16);
        assert_eq!(
            QuantPolicy::new(QuantScheme::F32),
            QuantPolicy::uniform(QuantScheme::F32)
        );
        let p = p.with_edges(QuantScheme::INT8);
        assert_eq!(p, QuantPolicy::uniform(QuantScheme::INT8));
        assert_eq!("ffn".parse::<TensorRole>().unwrap(), TensorRole::Mlp);
    }
}
