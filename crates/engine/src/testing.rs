//! Seeded tiny models for the crate's unit tests.

use afo_quant::QLinear;
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::Result;
use crate::model::{Model, WeightSource};

/// The vocabulary of the tiny models.
pub(crate) const VOCAB: usize = 50;

/// A two-layer Llama with grouped-query attention.
pub(crate) fn config() -> ModelConfig {
    ModelConfig {
        arch: Architecture::Llama,
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        rope_interleaved: false,
        max_position: 256,
        tie_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
        sliding_window: None,
    }
}

/// Weights from a seeded generator (`scale` 0: all zero), norms 1.
struct Seeded {
    state: u64,
    scale: f32,
}

impl Seeded {
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                ((self.state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * self.scale
            })
            .collect()
    }
}

impl WeightSource for Seeded {
    fn contains(&self, name: &str) -> bool {
        name != "output.weight" && name != "rope_freqs.weight"
    }
    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        _bias: Option<&str>,
    ) -> Result<QLinear> {
        let w = Tensor::from_vec(self.values(out * inp), (out, inp), &Device::Cpu)?;
        Ok(QLinear::dense(name, w, None)?)
    }
    fn vector(&mut self, _name: &str, len: usize) -> Result<Tensor> {
        Ok(Tensor::ones(len, DType::F32, &Device::Cpu)?)
    }
}

/// The model of `config` with seeded weights of magnitude `scale`.
pub(crate) fn model_with(config: ModelConfig, scale: f32) -> Model {
    let mut source = Seeded {
        state: 0x2545_F491_4F6C_DD1D,
        scale,
    };
    Model::load(config, &mut source).unwrap()
}

/// The model of [`config`] with seeded weights of magnitude `scale`.
pub(crate) fn model(scale: f32) -> Model {
    model_with(config(), scale)
}

/// `n` varied token ids.
pub(crate) fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 31 + 7) % VOCAB) as u32).collect()
}
