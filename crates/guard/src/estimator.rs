//! Predicting a run's peak memory from facts, with a breakdown.

use std::fmt;

use crate::bytesize::ByteSize;
use crate::ledger::{KindBytes, MemoryKind};

/// The shape of a decoder model: what the KV cache and activations depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Transformer layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// MLP intermediate size.
    pub intermediate: u64,
    /// Attention (query) heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Dimension of one head.
    pub head_dim: u64,
    /// Vocabulary size.
    pub vocab: u64,
}

impl ModelShape {
    /// KV-cache bytes one token takes in this model with caches in `format`: see
    /// [`kv_bytes_per_token`].
    pub fn kv_bytes_per_token(&self, format: KvFormat) -> u64 {
        kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, format)
    }
}

/// How a KV cache stores its keys and values: what one head's key (or value) row of
/// `head_dim` elements costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[allow(non_camel_case_types)]
pub enum KvFormat {
    /// 32-bit floats.
    F32,
    /// IEEE half floats: the default. Half the bytes of f32 (so twice the tokens
    /// under a cutline) and the attention's reads of the cache halved, for a rounding
    /// that moves SmolLM2's perplexity by +0.05% at ctx 512 and +0.26% at ctx 2048
    /// (`docs/benchmarks.md`); llama.cpp's default too. Values past f16's range are
    /// held at its largest finite value, 65,504 (`afo_kvcache` saturates them).
    #[default]
    F16,
    /// bfloat16.
    BF16,
    /// GGML's Q8_0 blocks: per 32 elements one `f16` scale and 32 `i8` quants, 34
    /// bytes (8.5 bits per element). `head_dim` must be a multiple of 32.
    Q8_0,
}

impl KvFormat {
    /// Every format.
    pub const ALL: [KvFormat; 4] = [KvFormat::F32, KvFormat::F16, KvFormat::BF16, KvFormat::Q8_0];

    /// Bytes of one head's key (or value) row of `head_dim` elements (for Q8_0, whole
    /// blocks: `head_dim / 32 x 34`, rounded up).
    pub const fn row_bytes(self, head_dim: u64) -> u64 {
        match self {
            KvFormat::F32 => head_dim * 4,
            KvFormat::F16 | KvFormat::BF16 => head_dim * 2,
            KvFormat::Q8_0 => head_dim.div_ceil(32) * 34,
        }
    }

    /// The name users write (`f32`, `f16`, `bf16`, `q8_0`).
    pub const fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::BF16 => "bf16",
            KvFormat::Q8_0 => "q8_0",
        }
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        KvFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown KV cache format {s:?}: expected one of f32, f16, bf16, q8_0")
            })
    }
}

/// KV-cache bytes one token of one sequence takes: `layers x 2 (keys and values) x
/// kv_heads x` [`KvFormat::row_bytes`]`(head_dim)`. The one formula: the KV cache's
/// own layout (`afo_kvcache::KvCacheConfig::bytes_per_token`) and the catalog's
/// estimates both call it.
pub fn kv_bytes_per_token(layers: u64, kv_heads: u64, head_dim: u64, format: KvFormat) -> u64 {
    layers * 2 * kv_heads * format.row_bytes(head_dim)
}

/// Where the weights' bytes come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weights {
    /// Exact: the sum of the tensors' byte sizes (read from the model file).
    Bytes(u64),
    /// From a parameter count and the bits each parameter takes in its scheme
    /// (32 for f32, 16 for f16/bf16, 8.5 for Q8_0, 5 for Q4_1, ...).
    Params {
        /// Number of parameters.
        count: u64,
        /// Bits per parameter, scales included.
        bits_per_param: f64,
    },
}

impl Weights {
    /// The bytes.
    pub fn bytes(&self) -> u64 {
        match *self {
            Weights::Bytes(b) => b,
            Weights::Params {
                count,
                bits_per_param,
            } => (count as f64 * bits_per_param / 8.0).ceil() as u64,
        }
    }
}

/// One planned run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    /// The weights (counted once: shared by every run of the model).
    pub weights: Weights,
    /// The model's shape.
    pub shape: ModelShape,
    /// Prompt tokens per sequence.
    pub prompt_tokens: u64,
    /// Tokens to generate per sequence.
    pub max_new_tokens: u64,
    /// Sequences run together.
    pub batch: u64,
    /// KV-cache bytes one token of one sequence takes, all layers, keys and values
    /// (the engine's cache layout says it: `afo_kvcache::KvCacheConfig::bytes_per_token`).
    pub kv_bytes_per_token: u64,
    /// The most prompt tokens run through the model in one forward pass.
    pub prefill_chunk: u64,
    /// Images, as (width x height) pixels after resizing, one entry per image.
    pub image_pixels: Vec<u64>,
    /// Vision tokens the images become, in total.
    pub vision_tokens: u64,
    /// What the run's last pass produces: logits to sample from, or pooled hidden
    /// states.
    pub output: RunOutput,
    /// How the model's attention holds its scores.
    pub attention: AttentionMemory,
}

/// How a forward pass's attention holds its scores: what the activations term counts
/// for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMemory {
    /// A fused (flash-style) kernel: scores live a chunk of keys at a time in each
    /// thread's scratch (tens of KiB, under the base overhead); what grows is its
    /// per-query accumulators and its output, `2 x B x C x heads x head_dim x 4`,
    /// whatever the context length. The engine's CPU attention over caches of every format.
    #[default]
    Fused,
    /// The score matrix and its softmax materialised, `2 x B x heads x C x T x 4`
    /// (another device, or a pruning policy that reads the attention weights); with
    /// `decoded_cache`, a cache not held in f32 is also decoded to f32 for the
    /// product, one layer's keys and values at a time: `2 x B x kv_heads x T x
    /// head_dim x 4` more.
    Materialized {
        /// Whether the cache's keys and values are decoded to f32 copies.
        decoded_cache: bool,
    },
}

/// What a run produces from the model's final hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunOutput {
    /// Logits over the vocabulary for each sequence (a generation; the default).
    #[default]
    Logits,
    /// Pooled hidden states, no LM head and no logits (an embedding run): `vectors`
    /// vectors of `hidden` values in all.
    Embeddings {
        /// The vectors the run returns.
        vectors: u64,
    },
}

/// A prediction, broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    /// Weights.
    pub weights: u64,
    /// KV cache at its fullest.
    pub kv_cache: u64,
    /// Activations of the largest forward pass.
    pub activations: u64,
    /// Logits workspace.
    pub logits: u64,
    /// Pooled embedding vectors (an embedding run).
    pub embeddings: u64,
    /// Image buffers.
    pub images: u64,
    /// Runtime overhead.
    pub overhead: u64,
    /// The sum: the predicted peak.
    pub total: u64,
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "total {} = weights {} + kv {} + activations {} + logits {} + images {} + overhead {}",
            ByteSize(self.total),
            ByteSize(self.weights),
            ByteSize(self.kv_cache),
            ByteSize(self.activations),
            ByteSize(self.logits),
            ByteSize(self.images),
            ByteSize(self.overhead)
        )?;
        if self.embeddings > 0 {
            write!(f, " (embeddings {})", ByteSize(self.embeddings))?;
        }
        Ok(())
    }
}

/// Predicts peak bytes. The formulas, with `T = prompt_tokens + max_new_tokens`,
/// `B = batch`, `C = min(prompt_tokens, prefill_chunk)` (at least 1), f32 = 4 bytes:
///
/// - **weights**: [`Weights::bytes`];
/// - **KV cache**: `kv_bytes_per_token x T x B` (the cache's own figure per token:
///   `layers x 2 x kv_heads x` the bytes of a head row in its [`KvFormat`]);
/// - **activations** (one layer's working set in the largest forward pass, buffers
///   reused across layers): `B x C x (4 x hidden + 3 x intermediate + (heads + 2 x
///   kv_heads) x head_dim) x 4`, or for a decode step of the `B` sequences, whose gate
///   and up products hold their outputs and the tiles they are computed in together,
///   `B x (4 x hidden + 4 x intermediate + (heads + 2 x kv_heads) x head_dim) x 4` when
///   that is more (a one-token chunk), plus attention's own ([`AttentionMemory`]): for the
///   fused kernel `2 x B x C x heads x head_dim x 4` (its accumulators and output),
///   for materialised scores `B x heads x C x T x 4` twice (the scores and their
///   softmax are alive together), plus `2 x B x kv_heads x T x head_dim x 4` when a
///   cache held in another format is decoded to f32 for them;
/// - **logits**: `B x vocab x 4 x 2` (the logits and the sampler's working copy), for
///   [`RunOutput::Logits`]; none for an embedding run;
/// - **embeddings**: for [`RunOutput::Embeddings`], `vectors x hidden x 4 x 2` (the
///   pooled vectors and their encoded copy in the response); the final hidden states
///   they are pooled from are a chunk's activations, counted above;
/// - **images**: for each image `pixels x 3 x (1 + 4)` (the u8 buffer and its f32
///   copy), plus `vision_tokens x hidden x 4 x 4` for the vision encoder's states;
/// - **overhead**: [`Estimator::base_overhead`] (the runtime itself: code, tokenizer,
///   allocator slack) plus [`Estimator::overhead_fraction`] of everything above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimator {
    /// Fixed bytes of the runtime. Default 48 MiB.
    pub base_overhead: u64,
    /// Fraction added for allocator fragmentation and temporaries. Default 0.05.
    pub overhead_fraction: f64,
}

impl Default for Estimator {
    fn default() -> Self {
        Self {
            base_overhead: 48 << 20,
            overhead_fraction: 0.05,
        }
    }
}

impl Estimator {
    /// The prediction for `plan`.
    pub fn estimate(&self, plan: &RunPlan) -> Estimate {
        let s = &plan.shape;
        let b = plan.batch.max(1);
        let t = plan.prompt_tokens + plan.max_new_tokens;
        let c = plan.prompt_tokens.min(plan.prefill_chunk).max(1);
        let weights = plan.weights.bytes();
        let kv_cache = plan.kv_bytes_per_token * t * b;
        let per_token = 4 * s.hidden + 3 * s.intermediate + (s.heads + 2 * s.kv_heads) * s.head_dim;
        let attention = match plan.attention {
            AttentionMemory::Fused => 2 * b * c * s.heads * s.head_dim * 4,
            AttentionMemory::Materialized { decoded_cache } => {
                let decoded = if decoded_cache {
                    2 * b * s.kv_heads * t.max(1) * s.head_dim * 4
                } else {
                    0
                };
                2 * b * s.heads * c * t.max(1) * 4 + decoded
            }
        };
        // A prompt chunk's rows, or a decode step's (one a sequence; its gate and up
        // tiles beside their outputs: one more intermediate row).
        let rows = (c * per_token).max(per_token + s.intermediate);
        let activations = b * rows * 4 + attention;
        let (logits, embeddings) = match plan.output {
            RunOutput::Logits => (b * s.vocab * 4 * 2, 0),
            RunOutput::Embeddings { vectors } => (0, vectors * s.hidden * 4 * 2),
        };
        let images = plan.image_pixels.iter().map(|p| p * 3 * 5).sum::<u64>()
            + plan.vision_tokens * s.hidden * 4 * 4;
        let sum = weights + kv_cache + activations + logits + embeddings + images;
        let overhead = self.base_overhead + (sum as f64 * self.overhead_fraction) as u64;
        Estimate {
            weights,
            kv_cache,
            activations,
            logits,
            embeddings,
            images,
            overhead,
            total: sum + overhead,
        }
    }

    /// What a run reserves in the ledger for `estimate`, beyond the weights (reserved
    /// by the model's load) and the runtime itself (reserved at start-up): its KV
    /// cache, its workspace (activations and logits) and its images, each with the
    /// [`Estimator::overhead_fraction`] for allocator slack.
    pub fn run_parts(&self, estimate: &Estimate) -> KindBytes {
        let slack = |b: u64| b + (b as f64 * self.overhead_fraction) as u64;
        KindBytes::of(MemoryKind::KvCache, slack(estimate.kv_cache))
            .with(
                MemoryKind::Workspace,
                slack(estimate.activations + estimate.logits + estimate.embeddings),
            )
            .with(MemoryKind::Images, slack(estimate.images))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelShape {
        ModelShape {
            layers: 30,
            hidden: 576,
            intermediate: 1536,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
        }
    }

    fn plan(prompt: u64, new: u64, batch: u64) -> RunPlan {
        RunPlan {
            weights: Weights::Bytes(100 << 20),
            shape: smollm2(),
            prompt_tokens: prompt,
            max_new_tokens: new,
            batch,
            kv_bytes_per_token: 30 * 2 * 3 * 64 * 4,
            prefill_chunk: 512,
            image_pixels: Vec::new(),
            vision_tokens: 0,
            output: RunOutput::Logits,
            attention: AttentionMemory::Fused,
        }
    }

    #[test]
    fn fused_attention_does_not_grow_with_the_context() {
        let est = Estimator::default();
        let fused = |prompt, new| est.estimate(&plan(prompt, new, 1)).activations;
        let materialized = |prompt, new| {
            let mut p = plan(prompt, new, 1);
            p.attention = AttentionMemory::Materialized {
                decoded_cache: false,
            };
            est.estimate(&p).activations
        };
        // 512 prompt tokens (one chunk): the activations of a chunk, the same for any
        // number of generated tokens when fused.
        assert_eq!(fused(512, 100), fused(512, 8000));
        let per_token = 4 * 576 + 3 * 1536 + (9 + 2 * 3) * 64;
        assert_eq!(fused(512, 100), 512 * per_token * 4 + 2 * 512 * 9 * 64 * 4);
        // Materialised scores grow with every position the chunk attends to.
        assert_eq!(
            materialized(512, 100) - 512 * per_token * 4,
            2 * 9 * 512 * 612 * 4
        );
        assert!(materialized(512, 8000) > 10 * fused(512, 8000));
        // A one-token prompt: the decode step's live set, its gate and up tiles with
        // their outputs.
        assert_eq!(
            fused(1, 100),
            (per_token + 1536) * 4 + 2 * 9 * 64 * 4,
            "decode step"
        );
    }

    #[test]
    fn an_embedding_run_has_no_logits_and_no_growth_past_its_input() {
        let est = Estimator::default();
        let mut embed = plan(100, 0, 1);
        embed.output = RunOutput::Embeddings { vectors: 3 };
        let e = est.estimate(&embed);
        let g = est.estimate(&plan(100, 0, 1));
        assert_eq!(e.logits, 0);
        assert_eq!(e.embeddings, 3 * 576 * 4 * 2);
        assert_eq!(e.kv_cache, g.kv_cache);
        assert_eq!(e.activations, g.activations);
        assert!(e.total < g.total);
        assert_eq!(
            e.total,
            e.weights + e.kv_cache + e.activations + e.embeddings + e.images + e.overhead
        );
        let parts = est.run_parts(&e);
        assert!(parts.get(MemoryKind::Workspace) >= e.activations + e.embeddings);
    }

    #[test]
    fn the_cache_format_sets_the_bytes_of_a_row() {
        let s = smollm2();
        assert_eq!(s.kv_bytes_per_token(KvFormat::F32), 30 * 2 * 3 * 64 * 4);
        assert_eq!(s.kv_bytes_per_token(KvFormat::F16), 30 * 2 * 3 * 64 * 2);
        assert_eq!(s.kv_bytes_per_token(KvFormat::BF16), 30 * 2 * 3 * 64 * 2);
        // Two Q8_0 blocks of 34 bytes per 64-element head row: 8.5 bits per element.
        assert_eq!(s.kv_bytes_per_token(KvFormat::Q8_0), 30 * 2 * 3 * 2 * 34);
        assert_eq!(
            KvFormat::Q8_0.row_bytes(40),
            2 * 34,
            "partial blocks count whole"
        );
        for f in KvFormat::ALL {
            assert_eq!(f.name().parse::<KvFormat>(), Ok(f));
            assert_eq!(f.to_string().to_uppercase().parse::<KvFormat>(), Ok(f));
        }
        let err = "q4_k".parse::<KvFormat>().unwrap_err();
        assert!(err.contains("q4_k") && err.contains("q8_0"), "{err}");
        // A decoded cache adds one layer's f32 keys and values to materialised scores.
        let est = Estimator::default();
        let with = |decoded_cache| {
            let mut p = plan(100, 28, 2);
            p.attention = AttentionMemory::Materialized { decoded_cache };
            est.estimate(&p).activations
        };
        assert_eq!(with(true) - with(false), 2 * 2 * 3 * 128 * 64 * 4);
    }

    #[test]
    fn kv_cache_formula() {
        let e = Estimator::default().estimate(&plan(100, 28, 1));
        // 30 layers x 2 x 3 heads x 64 x 128 tokens x 4 bytes.
        assert_eq!(e.kv_cache, 30 * 2 * 3 * 64 * 128 * 4);
        let e8 = Estimator::default().estimate(&plan(100, 28, 8));
        assert_eq!(e8.kv_cache, 8 * e.kv_cache);
        assert_eq!(e.weights, 100 << 20);
        assert_eq!(
            e.total,
            e.weights + e.kv_cache + e.activations + e.logits + e.images + e.overhead
        );
    }

    #[test]
    fn grows_with_every_input() {
        let est = Estimator::default();
        let base = est.estimate(&plan(100, 100, 1)).total;
        assert!(est.estimate(&plan(200, 100, 1)).total > base);
        assert!(est.estimate(&plan(100, 200, 1)).total > base);
        assert!(est.estimate(&plan(100, 100, 2)).total > base);
        let mut with_image = plan(100, 100, 1);
        with_image.image_pixels = vec![1024 * 1024];
        with_image.vision_tokens = 1024;
        let e = est.estimate(&with_image);
        assert_eq!(e.images, 1024 * 1024 * 15 + 1024 * 576 * 16);
    }

    #[test]
    fn params_weights() {
        let w = Weights::Params {
            count: 1000,
            bits_per_param: 4.5,
        };
        assert_eq!(w.bytes(), 563);
    }
}
