//! Our own forward pass for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2,
//! Qwen3) on candle-core ops.
//!
//! The model is immutable and shared (`Send + Sync`, behind an `Arc`); everything a
//! sequence owns lives in its [`KvCache`]. Linear layers are [`QLinear`]s (dense or
//! quantized), so the same code runs f32 safetensors and Q4_1 GGUF files.
//!
//! # Weight names
//!
//! A [`WeightSource`] is asked for tensors by their GGUF names; other formats map
//! these onto theirs (see `gguf_to_hf_name` for Hugging Face checkpoints):
//!
//! | name | shape | notes |
//! | --- | --- | --- |
//! | `token_embd.weight` | `[vocab, hidden]` | also the LM head when `output.weight` is absent |
//! | `blk.N.attn_norm.weight` | `[hidden]` | |
//! | `blk.N.attn_q.weight` / `attn_k` / `attn_v` | `[heads * head_dim, hidden]` (k, v: kv heads) | `.bias` too for Qwen2 |
//! | `blk.N.attn_q_norm.weight` / `attn_k_norm` | `[head_dim]` | Qwen3 |
//! | `blk.N.attn_output.weight` | `[hidden, heads * head_dim]` | |
//! | `blk.N.ffn_norm.weight` | `[hidden]` | |
//! | `blk.N.ffn_gate.weight` / `ffn_up` | `[intermediate, hidden]` | |
//! | `blk.N.ffn_down.weight` | `[hidden, intermediate]` | |
//! | `output_norm.weight` | `[hidden]` | |
//! | `output.weight` | `[vocab, hidden]` | optional (untied head) |
//! | `rope_freqs.weight` | `[head_dim / 2]` | optional: llama.cpp's Llama 3 RoPE divisors |

use std::sync::RwLock;

use afo_kvcache::{KvCache, KvCacheConfig, KvFormat, PrunePolicy};
use afo_quant::QLinear;
use candle_core::{Device, Tensor};

use crate::activation::add;
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::generate::Decode;

/// The optional tensor of RoPE frequency divisors (Llama 3 scaling in GGUF files).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Which positions' logits a forward pass returns (or, for [`Model::forward_hidden`],
/// which positions' hidden states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's: `[1, vocab]`.
    Last,
    /// Every position's: `[tokens, vocab]` (perplexity, scoring).
    All,
}

/// Where the model's weights come from, by GGUF tensor name.
pub trait WeightSource {
    /// Whether the source has a tensor.
    fn contains(&self, name: &str) -> bool;
    /// A `[out, inp]` weight as a linear layer, with its bias when `bias` names one.
    ///
    /// # Errors
    /// [`Error::MissingTensor`], [`Error::TensorShape`], or a read error.
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: Option<&str>)
    -> Result<QLinear>;
    /// A 1-D f32 vector of `len` values (a norm weight).
    ///
    /// # Errors
    /// [`Error::MissingTensor`], [`Error::TensorShape`], or a read error.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor>;
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q: QLinear,
    k: QLinear,
    v: QLinear,
    o: QLinear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
}

/// A loaded decoder.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed: QLinear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<QLinear>,
    rope: Rope,
    device: Device,
    /// How this model's KV caches hold keys and values.
    kv_format: KvFormat,
}

impl Model {
    /// Builds the model from a weight source.
    ///
    /// # Errors
    /// When a tensor is missing or has the wrong shape.
    pub fn load(config: ModelConfig, source: &mut dyn WeightSource) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let embed = source.linear("token_embd.weight", c.vocab_size, h, None)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            let bias = |s: &str| c.qkv_bias.then(|| format!("blk.{i}.{s}.bias"));
            layers.push(Layer {
                attn_norm: source.vector(&name("attn_norm.weight"), h)?,
                q: source.linear(
                    &name("attn_q.weight"),
                    c.num_heads * hd,
                    h,
                    bias("attn_q").as_deref(),
                )?,
                k: source.linear(
                    &name("attn_k.weight"),
                    c.num_kv_heads * hd,
                    h,
                    bias("attn_k").as_deref(),
                )?,
                v: source.linear(
                    &name("attn_v.weight"),
                    c.num_kv_heads * hd,
                    h,
                    bias("attn_v").as_deref(),
                )?,
                o: source.linear(&name("attn_output.weight"), h, c.num_heads * hd, None)?,
                q_norm: if c.qk_norm {
                    Some(source.vector(&name("attn_q_norm.weight"), hd)?)
                } else {
                    None
                },
                k_norm: if c.qk_norm {
                    Some(source.vector(&name("attn_k_norm.weight"), hd)?)
                } else {
                    None
                },
                ffn_norm: source.vector(&name("ffn_norm.weight"), h)?,
                gate: source.linear(&name("ffn_gate.weight"), c.intermediate_size, h, None)?,
                up: source.linear(&name("ffn_up.weight"), c.intermediate_size, h, None)?,
                down: source.linear(&name("ffn_down.weight"), h, c.intermediate_size, None)?,
            });
        }
        let norm = source.vector("output_norm.weight", h)?;
        let lm_head = if source.contains("output.weight") {
            Some(source.linear("output.weight", c.vocab_size, h, None)?)
        } else {
            None
        };
        let mut config = config;
        config.tie_embeddings = lm_head.is_none();
        // llama.cpp writes Llama 3's RoPE scaling as per-frequency divisors.
        let rope = if source.contains(ROPE_FREQS) {
            let factors = source.vector(ROPE_FREQS, config.head_dim / 2)?;
            config.rope_scaling = RopeScaling::None;
            Rope::new(&config, Some(&factors.to_vec1::<f32>()?))
        } else {
            Rope::new(&config, None)
        };
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: Device::Cpu,
            kv_format: KvFormat::F32,
        })
    }

    /// How this model's KV caches hold keys and values: f32 as built, the exact
    /// reference the other formats are measured against (the runtime and the CLI set
    /// [`KvFormat::default`], f16, unless asked otherwise). Every cache it
    /// makes from now on, and every memory estimate of it ([`Model::kv_bytes_per_token`]),
    /// uses `format`.
    ///
    /// # Errors
    /// [`Error::KvCache`] when the format cannot hold this model's heads (Q8_0 needs a
    /// head size that is a multiple of 32).
    pub fn set_kv_format(&mut self, format: KvFormat) -> Result<()> {
        let probe = KvCacheConfig {
            format,
            ..self.cache_config(1, None, PrunePolicy::None)
        };
        probe.validate()?;
        self.kv_format = format;
        Ok(())
    }

    /// How this model's KV caches hold keys and values.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes the weights keep resident.
    pub fn weight_bytes(&self) -> u64 {
        let vec_bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|q| q.bytes())
                    .sum::<u64>()
                    + vec_bytes(&l.attn_norm)
                    + vec_bytes(&l.ffn_norm)
                    + l.q_norm.as_ref().map_or(0, vec_bytes)
                    + l.k_norm.as_ref().map_or(0, vec_bytes)
            })
            .sum();
        self.embed.bytes()
            + layers
            + vec_bytes(&self.norm)
            + self.lm_head.as_ref().map_or(0, QLinear::bytes)
    }

    /// Bytes the weights would take as f32 (four bytes a weight, the biases and the
    /// norms): what
    /// the share of a quantized model is taken of. An f32 model in memory may hold
    /// less ([`Model::weight_bytes`]): its panels keep exponents in four-bit codes
    /// where the AVX-512 kernel runs.
    pub fn f32_weight_bytes(&self) -> u64 {
        let matrices: usize = self
            .linears()
            .iter()
            .map(|(_, q)| {
                let bias = q.bias().map_or(0, Tensor::elem_count);
                (q.in_features() * q.out_features() + bias) * 4
            })
            .sum();
        let vectors: usize = self.vectors().iter().map(|(_, t)| t.elem_count() * 4).sum();
        (matrices + vectors) as u64
    }

    /// Every linear layer by its GGUF name, in file order (the tied head is not
    /// repeated).
    pub fn linears(&self) -> Vec<(String, &QLinear)> {
        let mut out = vec![("token_embd.weight".to_owned(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            for (part, q) in [
                ("attn_q", &l.q),
                ("attn_k", &l.k),
                ("attn_v", &l.v),
                ("attn_output", &l.o),
                ("ffn_gate", &l.gate),
                ("ffn_up", &l.up),
                ("ffn_down", &l.down),
            ] {
                out.push((format!("blk.{i}.{part}.weight"), q));
            }
        }
        if let Some(h) = &self.lm_head {
            out.push(("output.weight".to_owned(), h));
        }
        out
    }

    /// The linear layers one forward pass multiplies, by GGUF name: every layer's
    /// projections and the head (the embedding when tied). An untied embedding is only
    /// looked up, a row a token, so it is not among them.
    fn multiplied(&self) -> Vec<(String, &QLinear)> {
        let tied = self.lm_head.is_none();
        self.linears()
            .into_iter()
            .filter(|(name, _)| tied || name != "token_embd.weight")
            .collect()
    }

    /// Weight bytes one decode step reads: every matrix it multiplies, once (see
    /// [`Model::kernel_paths`]). With the KV cache's bytes, this is what a step's
    /// speed is held against on the memory-bandwidth roofline.
    pub fn decode_weight_bytes(&self) -> u64 {
        self.multiplied().iter().map(|(_, q)| q.bytes()).sum()
    }

    /// Which kernel multiplies the weights for a pass of `rows` tokens (1: a decode
    /// step), as `(path, matrices, bytes)` per distinct path, most bytes first; the
    /// path is [`QLinear::kernel_path`]'s (`q8_0 avx2`, `f16 dense avx2`, ...).
    pub fn kernel_paths(&self, rows: usize) -> Vec<(String, usize, u64)> {
        let mut paths: Vec<(String, usize, u64)> = Vec::new();
        for (_, q) in self.multiplied() {
            let path = q.kernel_path(rows);
            match paths.iter_mut().find(|(p, _, _)| *p == path) {
                Some((_, n, b)) => {
                    *n += 1;
                    *b += q.bytes();
                }
                None => paths.push((path, 1, q.bytes())),
            }
        }
        paths.sort_by_key(|p| std::cmp::Reverse(p.2));
        paths
    }

    /// Every vector (norm weights) by its GGUF name. Biases belong to their
    /// [`QLinear`]; RoPE frequency factors are folded into the RoPE tables.
    pub fn vectors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("blk.{i}.attn_norm.weight"), &l.attn_norm));
            if let Some(t) = &l.q_norm {
                out.push((format!("blk.{i}.attn_q_norm.weight"), t));
            }
            if let Some(t) = &l.k_norm {
                out.push((format!("blk.{i}.attn_k_norm.weight"), t));
            }
            out.push((format!("blk.{i}.ffn_norm.weight"), &l.ffn_norm));
        }
        out.push(("output_norm.weight".to_owned(), &self.norm));
        out
    }

    /// The storage scheme of the attention and MLP weights (of the first layer).
    pub fn quant_scheme(&self) -> Option<afo_quant::QuantScheme> {
        self.layers.first().map(|l| l.q.scheme())
    }

    /// A KV cache for one sequence of at most `max_tokens` (capped at the model's
    /// context).
    pub fn new_cache(&self, max_tokens: usize) -> KvCache {
        self.new_pruned_cache(max_tokens, None, PrunePolicy::None)
    }

    /// A KV cache that holds at most `budget` tokens, pruned by `policy` (see
    /// [`afo_kvcache`]); the sequence itself may run to `max_tokens` positions (capped
    /// at the model's context).
    pub fn new_pruned_cache(
        &self,
        max_tokens: usize,
        budget: Option<usize>,
        policy: PrunePolicy,
    ) -> KvCache {
        KvCache::new(self.cache_config(max_tokens, budget, policy), &self.device)
    }

    /// The layout of this model's KV caches: the one place their element type and
    /// shape are decided.
    fn cache_config(
        &self,
        max_tokens: usize,
        budget: Option<usize>,
        policy: PrunePolicy,
    ) -> KvCacheConfig {
        let c = &self.config;
        KvCacheConfig {
            layers: c.num_layers,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_tokens: max_tokens.min(c.max_position).max(1),
            block_tokens: 64,
            format: self.kv_format,
            budget_tokens: budget,
            policy,
        }
    }

    /// Whether attention over a cache of layout `cache` runs in the fused kernel
    /// ([`crate::attention`], which reads every cache format in place): caches on the
    /// CPU whose pruning policy does not read the attention weights. Otherwise the
    /// scores are materialised.
    fn fused_attention(&self, cache: &KvCacheConfig) -> bool {
        !cache.policy.needs_attention() && self.device.is_cpu()
    }

    /// How this model's attention holds its scores with caches pruned by `policy`
    /// (`None` for unpruned caches): what the memory estimate counts for it.
    pub fn attention_memory(&self, policy: PrunePolicy) -> afo_guard::AttentionMemory {
        if self.fused_attention(&self.cache_config(1, None, policy)) {
            afo_guard::AttentionMemory::Fused
        } else {
            afo_guard::AttentionMemory::Materialized {
                decoded_cache: self.kv_format != KvFormat::F32,
            }
        }
    }

    /// KV-cache bytes one token of one sequence takes in this model's caches (all
    /// layers, keys and values, in the caches' element type): the figure every memory
    /// estimate of this model uses.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.cache_config(1, None, PrunePolicy::None)
            .bytes_per_token()
    }

    /// The tokens a cache for `max_tokens` positions holds at most, with a `budget`
    /// of tokens when pruned (capped at the model's context).
    pub fn cache_tokens(&self, max_tokens: usize, budget: Option<usize>) -> usize {
        let c = self.cache_config(max_tokens, budget, PrunePolicy::None);
        budget.map_or(c.max_tokens, |b| b.min(c.max_tokens))
    }

    /// Runs `tokens` after what `cache` holds (their positions start at
    /// `cache.len()`), appends their keys and values to it, and returns logits (f32).
    ///
    /// # Errors
    /// [`Error::EmptyPrompt`] for no tokens, a token id out of range, a full cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        // The whole pass runs on one of rayon's workers: each parallel kernel then
        // starts from inside the pool instead of parking the calling thread once per
        // matrix (two context switches per layer and matrix, measured at a third of
        // decode time).
        if tokens.len() == 1 {
            // A decode step: ~120 short regions, on a team (see `afo_quant::team`).
            return rayon::scope(|_| {
                afo_quant::team::run(|| self.forward_in_pool(tokens, cache, logits))
            });
        }
        rayon::scope(|_| self.forward_in_pool(tokens, cache, logits))
    }

    fn forward_in_pool(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let x = self.embed.rows(tokens)?;
        self.forward_rows(RowInputs::plain(x), cache, logits)
    }

    /// The token embeddings of `tokens`, `[tokens, hidden]` (f32).
    ///
    /// # Errors
    /// A token id out of range.
    pub(crate) fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor> {
        Ok(self.embed.rows(tokens)?)
    }

    /// Runs prepared input rows (see [`RowInputs`]) after what `cache` holds: the
    /// multimodal path, where some rows are image features rather than token
    /// embeddings, positions are multi-axis, and features are added after early layers.
    pub(crate) fn forward_embeds(
        &self,
        inputs: RowInputs<'_>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        rayon::scope(|_| self.forward_rows(inputs, cache, logits))
    }

    fn forward_rows(
        &self,
        inputs: RowInputs<'_>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let x = self.hidden_rows(inputs, cache, Some(logits))?;
        Ok(self.lm_head.as_ref().unwrap_or(&self.embed).forward(&x)?)
    }

    /// Runs `tokens` after what `cache` holds, as [`Model::forward`] does, and returns
    /// the final hidden states (after the final norm, before the LM head), f32: `[1,
    /// hidden]` for [`Logits::Last`], `[tokens, hidden]` for [`Logits::All`]. The
    /// pooled embeddings of [`crate::embed`] are made from these.
    ///
    /// # Errors
    /// As [`Model::forward`].
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        rows: Logits,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        rayon::scope(|_| {
            let x = self.embed.rows(tokens)?;
            self.hidden_rows(RowInputs::plain(x), cache, Some(rows))
        })
    }

    /// Runs `tokens` after what `cache` holds and appends them to it, computing no
    /// logits: a prompt's chunk before its last one. Past the last layer's attention
    /// (whose keys and values every row writes to the cache) nothing runs for any row,
    /// nor does the LM head. What the cache holds afterwards is what
    /// [`Model::forward`] leaves.
    ///
    /// # Errors
    /// As [`Model::forward`].
    pub fn extend(&self, tokens: &[u32], cache: &mut KvCache) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        rayon::scope(|_| {
            let x = self.embed.rows(tokens)?;
            self.hidden_rows(RowInputs::plain(x), cache, None)
                .map(|_| ())
        })
    }

    /// The layer loop of every single-sequence pass: the final-normed hidden states of
    /// the rows `rows` selects; `None` selects no row (an empty `[0, hidden]`): the
    /// layers run only as far as the cache needs.
    fn hidden_rows(
        &self,
        inputs: RowInputs<'_>,
        cache: &mut KvCache,
        rows: Option<Logits>,
    ) -> Result<Tensor> {
        let RowInputs { x, rope, inject } = inputs;
        let t = x.dim(0)?;
        if t == 0 {
            return Err(Error::EmptyPrompt);
        }
        let c = &self.config;
        let mut seq = SeqStep::new(self, cache, t)?;
        if let Some((cos, sin)) = rope {
            seq.cos = cos;
            seq.sin = sin;
        }
        let mut x = x;
        let eps = c.rms_norm_eps as f32;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let h = crate::activation::rms_norm(&x, &layer.attn_norm, eps)?;
            let [q, k, v] = QLinear::forward_many([&layer.q, &layer.k, &layer.v], &h)?;
            let mut attn = self.attend(i, layer, &q, &k, &v, cache, &mut seq)?;
            let injected = inject.is_some_and(|(_, features)| features.get(i).is_some());
            if i == last && rows.is_none() {
                // No row's output is asked for: the cache holds every row's keys and
                // values now (features injected after this layer would only reach
                // the logits).
                cache.commit(t)?;
                return Ok(x.narrow(0, 0, 0)?);
            }
            if i == last && rows == Some(Logits::Last) && t > 1 && !injected {
                // Past the last attention, a row only feeds its own logits: the rows
                // whose logits are not asked for skip the output projection and the
                // MLP.
                attn = attn.narrow(0, t - 1, 1)?;
                x = x.narrow(0, t - 1, 1)?;
            }
            x = add(&x, &layer.o.forward(&attn)?)?;
            x = add(&x, &self.mlp(layer, &x, false)?)?;
            if let Some((rows, features)) = inject
                && let Some(f) = features.get(i)
            {
                x = x.index_add(rows, f, 0)?;
            }
        }
        cache.commit(t)?;
        let n = x.dim(0)?;
        let x = match rows {
            Some(Logits::Last) if n > 1 => x.narrow(0, n - 1, 1)?,
            Some(_) => x,
            None => return Ok(x.narrow(0, 0, 0)?),
        };
        crate::activation::rms_norm(&x, &self.norm, eps)
    }

    /// One decode step for many sequences at once: `tokens[i]` follows what
    /// `caches[i]` holds. The linear layers run once over all rows (each weight is read
    /// once per step, not once per sequence); attention runs per sequence over its own
    /// cache. Returns the logits `[sequences, vocab]`.
    ///
    /// # Errors
    /// [`Error::EmptyPrompt`] for no sequences or a count mismatch, and the errors of
    /// [`Model::forward`].
    pub fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(Error::EmptyPrompt);
        }
        // On a team of the pool's threads: a step is ~150 short regions (see
        // `afo_quant::team`).
        rayon::scope(|_| afo_quant::team::run(|| self.forward_batch_in_pool(tokens, caches)))
    }

    fn forward_batch_in_pool(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let c = &self.config;
        let mut steps = caches
            .iter_mut()
            .map(|cache| SeqStep::new(self, cache, 1))
            .collect::<Result<Vec<_>>>()?;
        let mut x = self.embed.rows(tokens)?;
        let eps = c.rms_norm_eps as f32;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = crate::activation::rms_norm(&x, &layer.attn_norm, eps)?;
            // Each row is its own sequence: computed as it would be alone, so that
            // batching never changes what a sequence generates.
            let [q, k, v] = QLinear::forward_many_sequences([&layer.q, &layer.k, &layer.v], &h)?;
            // Each sequence's heads, RoPE, cache append and attention, one job per
            // sequence on the pool's threads (its attention on the job's thread).
            let mut jobs: Vec<(
                usize,
                &mut &mut KvCache,
                &mut SeqStep,
                Option<Result<Tensor>>,
            )> = caches
                .iter_mut()
                .zip(steps.iter_mut())
                .enumerate()
                .map(|(s, (cache, step))| (s, cache, step, None))
                .collect();
            afo_quant::team::for_each_mut(&mut jobs, |(s, cache, step, out)| {
                let row = |t: &Tensor| t.narrow(0, *s, 1);
                let mut run = || -> Result<Tensor> {
                    match self.attend_inputs(
                        i,
                        layer,
                        &row(&q)?,
                        &row(&k)?,
                        &row(&v)?,
                        cache,
                        step,
                    )? {
                        Attended::Done(t) => Ok(t),
                        Attended::Fused { q, k, v, window } => {
                            crate::attention::causal_attention_here(&q, &k, &v, window)
                        }
                    }
                };
                *out = Some(run());
            });
            let rows = jobs
                .into_iter()
                // Every job runs (`for_each_mut` visits each item once): none is left
                // without its output; were one, its sequence would be refused.
                .map(|(_, _, _, out)| out.unwrap_or(Err(Error::EmptyPrompt)))
                .collect::<Result<Vec<_>>>()?;
            let attn = crate::activation::cat_rows(&rows)?;
            x = add(&x, &layer.o.forward_sequences(&attn)?)?;
            x = add(&x, &self.mlp(layer, &x, true)?)?;
        }
        for cache in caches.iter_mut() {
            cache.commit(1)?;
        }
        let x = crate::activation::rms_norm(&x, &self.norm, eps)?;
        Ok(self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .forward_sequences(&x)?)
    }

    /// The MLP block's output for `x` (before the residual); `sequences`: the rows are
    /// independent sequences (see [`QLinear::forward_sequences`]).
    fn mlp(&self, layer: &Layer, x: &Tensor, sequences: bool) -> Result<Tensor> {
        let h = crate::activation::rms_norm(x, &layer.ffn_norm, self.config.rms_norm_eps as f32)?;
        let gate_up = [&layer.gate, &layer.up];
        let [g, u] = if sequences {
            QLinear::forward_many_sequences(gate_up, &h)?
        } else {
            QLinear::forward_many(gate_up, &h)?
        };
        let act = crate::activation::silu_mul(&g, &u)?;
        Ok(if sequences {
            layer.down.forward_sequences(&act)?
        } else {
            layer.down.forward(&act)?
        })
    }

    /// Self-attention of one sequence's `t` new tokens (`q`, `k`, `v` are their
    /// projections, `[t, heads x head_dim]`): RoPE at the sequence's positions, the
    /// keys and values appended to its cache, attention over everything the cache
    /// holds. Returns `[t, heads x head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        i: usize,
        layer: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        seq: &mut SeqStep,
    ) -> Result<Tensor> {
        match self.attend_inputs(i, layer, q, k, v, cache, seq)? {
            Attended::Done(out) => Ok(out),
            Attended::Fused { q, k, v, window } => {
                crate::attention::causal_attention(&q, &k, &v, window)
            }
        }
    }

    /// [`Model::attend`] up to the fused kernel: the queries, keys and values it
    /// takes ([`Attended::Fused`]), or the result of the materialised product.
    #[allow(clippy::too_many_arguments)]
    fn attend_inputs(
        &self,
        i: usize,
        layer: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        seq: &mut SeqStep,
    ) -> Result<Attended> {
        let c = &self.config;
        let t = seq.t;
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let n_rep = c.num_heads / c.num_kv_heads;
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((1, t, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        if t <= PREFETCH_MAX_ROWS {
            // While the heads and RoPE run: the slots the append writes, and the first
            // rows of the first kv head that the attention reads (its own prefetches
            // then run ahead of it from there; all heads' rows at once were 2-3%
            // slower than the first head's, measured in one process).
            let len = cache.len();
            let row_bytes = 2 * cache.config().format.row_bytes(c.head_dim as u64) as usize;
            let first = PREFETCH_FIRST_BYTES / row_bytes.max(1);
            cache.prefetch(i, 0..c.num_kv_heads, len..len + t);
            cache.prefetch(i, 0..1, 0..len.min(first));
        }
        let v = heads(v, c.num_kv_heads)?;
        let norms = layer.q_norm.as_ref().zip(layer.k_norm.as_ref());
        let roped = match norms {
            // Without per-head norms, heads and RoPE in one pass.
            None => {
                let rope = |x: &Tensor, n: usize| {
                    rope_heads(x, n, c.head_dim, &seq.cos, &seq.sin, c.rope_interleaved)
                };
                rope(q, c.num_heads)?.zip(rope(k, c.num_kv_heads)?)
            }
            Some(_) => None,
        };
        let (q, k) = if let Some(qk) = roped {
            qk
        } else {
            let mut q = heads(q, c.num_heads)?;
            let mut k = heads(k, c.num_kv_heads)?;
            if let Some((qn, kn)) = norms {
                q = crate::activation::rms_norm(&q, qn, eps)?;
                k = crate::activation::rms_norm(&k, kn, eps)?;
            }
            rope_candle(&q, &k, &seq.cos, &seq.sin, c.rope_interleaved)?
        };
        let (k_all, v_all) = cache.append(i, &k, &v)?;
        if seq.fused {
            // f32 queries and caches of any format on the CPU (`fused_attention`); the
            // kernel checks its inputs and says what is wrong otherwise.
            return Ok(Attended::Fused {
                q,
                k: k_all,
                v: v_all,
                window: seq.window,
            });
        }
        // The materialised product needs f32 keys and values (a copy of this layer's
        // when the cache holds another format: counted by `attention_memory`).
        let (k_all, v_all) = if cache.config().format == KvFormat::F32 {
            (k_all, v_all)
        } else {
            let c = cache.config();
            (c.decode(&k_all)?, c.decode(&v_all)?)
        };
        let len = k_all.dim(2)?;
        // Grouped-query attention without copying keys: the n_rep query heads of
        // each kv head are stacked as rows of one matrix.
        let q = q.reshape((1, c.num_kv_heads, n_rep * t, c.head_dim))?;
        let scores = (q.matmul(&k_all.t()?)? * scale)?;
        let scores = match &seq.mask {
            Some(m) => scores
                .reshape((1, c.num_kv_heads, n_rep, t, len))?
                .broadcast_add(m)?
                .reshape((1, c.num_kv_heads, n_rep * t, len))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if seq.observe {
            cache.observe(i, &probs)?;
        }
        Ok(Attended::Done(
            probs
                .matmul(&v_all)?
                .reshape((1, c.num_heads, t, c.head_dim))?
                .transpose(1, 2)?
                .reshape((t, c.num_heads * c.head_dim))?,
        ))
    }
}

/// Rows of a step from which the cache is not prefetched ahead of the attention (a
/// prompt's chunk writes many lines in order, which the hardware's own prefetcher
/// follows, and computes long before it reads).
const PREFETCH_MAX_ROWS: usize = 4;

/// Bytes of the first kv head's keys and values asked for as a decode step's
/// attention inputs are prepared: 256 rows of an f16 cache (against 64 and 128 rows,
/// 3% and 1.5-2% faster a batched step, measured in one process).
const PREFETCH_FIRST_BYTES: usize = 64 << 10;

/// One sequence's attention, done or ready for the fused kernel.
enum Attended {
    /// The output, `[t, heads x head_dim]` (the materialised product).
    Done(Tensor),
    /// The inputs of [`crate::attention::causal_attention`]: queries
    /// `[1, heads, t, head_dim]`, the cache's keys and values, the window.
    Fused {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        window: usize,
    },
}

/// Input rows of a forward pass, beyond plain tokens.
pub(crate) struct RowInputs<'a> {
    /// The rows, `[t, hidden]`.
    pub(crate) x: Tensor,
    /// RoPE cos and sin for the rows (`[t, head_dim / 2]` each); `None`: the
    /// positions that follow the cache.
    pub(crate) rope: Option<(Tensor, Tensor)>,
    /// Row indices (u32) and, per early layer, features added at those rows after the
    /// layer (Qwen3-VL's DeepStack).
    pub(crate) inject: Option<(&'a Tensor, &'a [Tensor])>,
}

impl RowInputs<'_> {
    /// Rows at the positions that follow the cache, nothing injected.
    pub(crate) fn plain(x: Tensor) -> Self {
        Self {
            x,
            rope: None,
            inject: None,
        }
    }
}

impl Model {
    /// RoPE cos and sin for tokens at multi-axis positions (`[temporal, height,
    /// width]` each), interleaved as Qwen3-VL's M-RoPE lays them out: frequency `j`
    /// takes the height position when `j % 3 == 1` and `j < 3 * sections[1]`, the
    /// width position when `j % 3 == 2` and `j < 3 * sections[2]`, the temporal one
    /// otherwise. With the three positions equal this is plain RoPE.
    pub(crate) fn mrope_tables(
        &self,
        positions: &[[i64; 3]],
        sections: [usize; 3],
    ) -> Result<(Tensor, Tensor)> {
        let freqs = &self.rope.inv_freq;
        let half = freqs.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (j, f) in freqs.iter().enumerate() {
                let axis = match j % 3 {
                    1 if j < 3 * sections[1] => 1,
                    2 if j < 3 * sections[2] => 2,
                    _ => 0,
                };
                let angle = p[axis] as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let t = positions.len();
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }
}

/// What one sequence's step needs in every layer: its RoPE rows and its mask.
struct SeqStep {
    t: usize,
    cos: Tensor,
    sin: Tensor,
    /// The additive mask of the materialised path (`None` when nothing is masked, and
    /// for fused steps).
    mask: Option<Tensor>,
    /// Query `i` at key index `p = len - t + i` sees key `j` iff `j <= p` and
    /// `p - j < window` (`usize::MAX`: no window).
    window: usize,
    /// Whether attention runs in the fused kernel ([`crate::attention`]): f32 caches
    /// on the CPU whose policy does not observe the attention weights.
    fused: bool,
    observe: bool,
}

impl SeqStep {
    /// Makes room in `cache` for `t` tokens and prepares their positions and mask.
    fn new(model: &Model, cache: &mut KvCache, t: usize) -> Result<Self> {
        let c = &model.config;
        cache.make_room(t)?;
        // Positions count every token seen; a pruned cache holds fewer.
        let pos = cache.position();
        let held = cache.len();
        let (cos, sin) = model.rope.tables(pos, t, &model.device)?;
        let observe = cache.config().policy.needs_attention();
        let fused = model.fused_attention(cache.config());
        let (window, mask) = if held == pos {
            let window = c.sliding_window.unwrap_or(usize::MAX);
            let masked = !fused && (t > 1 || pos + t > window);
            let mask = masked
                .then(|| causal_mask(t, pos, window, &model.device))
                .transpose()?;
            (window, mask)
        } else {
            // Pruned: every held key is in the past of every new token.
            let mask = (!fused && t > 1)
                .then(|| causal_mask(t, held, usize::MAX, &model.device))
                .transpose()?;
            (usize::MAX, mask)
        };
        Ok(Self {
            t,
            cos,
            sin,
            mask,
            window,
            fused,
            observe,
        })
    }
}

/// The model as the generation loop sees it: last-position logits as a `Vec<f32>`.
impl Decode for Model {
    type State = KvCache;

    fn new_state(&self) -> KvCache {
        self.new_cache(self.config.max_position)
    }

    fn decode(&self, tokens: &[u32], state: &mut KvCache) -> Result<Vec<f32>> {
        Ok(self
            .forward(tokens, state, Logits::Last)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn extend(&self, tokens: &[u32], state: &mut KvCache) -> Result<()> {
        Model::extend(self, tokens, state)
    }
}

/// `[t, pos + t]`: 0 where query `i` (at position `p = pos + i`) may see key `j`
/// (`j <= p` and `p - j < window`), -inf elsewhere.
pub(crate) fn causal_mask(t: usize, pos: usize, window: usize, device: &Device) -> Result<Tensor> {
    let len = pos + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            let p = pos + i;
            (0..len).map(move |j| {
                if j <= p && p - j < window {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (t, len), device)?)
}

/// RoPE of query and key heads (`[1, heads, t, head_dim]`) at the positions of `cos`
/// and `sin` with candle's operations: interleaved pairs (`rope_i`) or halves (`rope`).
fn rope_candle(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<(Tensor, Tensor)> {
    let rope = if interleaved {
        candle_nn::rotary_emb::rope_i
    } else {
        candle_nn::rotary_emb::rope
    };
    Ok((rope(q, cos, sin)?, rope(k, cos, sin)?))
}

/// A projection's rows `x` (`[t, n x hd]`) as `n` heads `[1, n, t, hd]` with RoPE at
/// the positions of `cos` and `sin` (`[t, hd / 2]` each), in one pass: what
/// [`rope_candle`] gives for the heads (a reshape, a transpose and a copy first), bit
/// for bit: each pair `(a, b)` (interleaved: elements `2j` and `2j + 1`; halves: `j`
/// and `j + hd / 2`) becomes `(a cos - b sin, a sin + b cos)`, the same products and
/// sums in the same order. `None` when a tensor is not a contiguous f32 CPU tensor of
/// these sizes (the caller takes candle's operations).
fn rope_heads(
    x: &Tensor,
    n: usize,
    hd: usize,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Option<Tensor>> {
    let (t, width) = x.dims2()?;
    let half = hd / 2;
    if width != n * hd || !hd.is_multiple_of(2) || cos.dims2()? != (t, half) {
        return Ok(None);
    }
    let pass = |xs: &[f32], cs: &[f32], sn: &[f32]| -> Option<Vec<f32>> {
        let mut out = afo_quant::kernels::zeroed(t * width);
        for (h, head) in out.chunks_exact_mut(t * hd).enumerate() {
            for (i, dst) in head.chunks_exact_mut(hd).enumerate() {
                let src = xs.get(i * width + h * hd..i * width + (h + 1) * hd)?;
                let c = cs.get(i * half..(i + 1) * half)?;
                let s = sn.get(i * half..(i + 1) * half)?;
                if interleaved {
                    for (((d, a), c), s) in dst
                        .chunks_exact_mut(2)
                        .zip(src.chunks_exact(2))
                        .zip(c)
                        .zip(s)
                    {
                        let (x0, x1) = (a[0], a[1]);
                        d[0] = x0 * c - x1 * s;
                        d[1] = x0 * s + x1 * c;
                    }
                } else {
                    let (d0, d1) = dst.split_at_mut(half);
                    let (a0, a1) = src.split_at(half);
                    for ((((d0, d1), (x0, x1)), c), s) in
                        d0.iter_mut().zip(d1).zip(a0.iter().zip(a1)).zip(c).zip(s)
                    {
                        *d0 = x0 * c - x1 * s;
                        *d1 = x0 * s + x1 * c;
                    }
                }
            }
        }
        Some(out)
    };
    let out = afo_quant::in_place(x, |xs| {
        afo_quant::in_place(cos, |cs| {
            afo_quant::in_place(sin, |sn| pass(xs, cs, sn)).ok()
        })
        .ok()
    });
    match out {
        Ok(Some(Some(Some(v)))) => Ok(Some(Tensor::from_vec(v, (1, n, t, hd), x.device())?)),
        _ => Ok(None),
    }
}

/// RoPE cos/sin tables, grown on demand (never capped below the model's context).
#[derive(Debug)]
struct Rope {
    inv_freq: Vec<f32>,
    tables: RwLock<Option<(Tensor, Tensor)>>,
}

impl Rope {
    /// `factors` divide the frequencies (GGUF `rope_freqs.weight`); they replace
    /// `c.rope_scaling`.
    fn new(c: &ModelConfig, factors: Option<&[f32]>) -> Self {
        let half = c.head_dim / 2;
        // In f32, as Hugging Face transformers and candle compute it: the tables then
        // match theirs bit for bit.
        let theta = c.rope_theta as f32;
        let inv_freq = (0..half)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f32 / c.head_dim as f32);
                match factors {
                    Some(f) => freq / f[i],
                    None => scale_frequency(freq, c.rope_scaling),
                }
            })
            .collect();
        Self {
            inv_freq,
            tables: RwLock::new(None),
        }
    }

    /// cos and sin for positions `pos..pos + t`, each `[t, head_dim / 2]`.
    fn tables(&self, pos: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let end = pos + t;
        {
            let guard = self.tables.read().unwrap_or_else(|e| e.into_inner());
            if let Some((cos, sin)) = guard
                .as_ref()
                .filter(|(c, _)| c.dim(0).is_ok_and(|n| n >= end))
            {
                return Ok((cos.narrow(0, pos, t)?, sin.narrow(0, pos, t)?));
            }
        }
        let mut guard = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let have = guard.as_ref().map_or(Ok(0), |(c, _)| c.dim(0))?;
        if have < end {
            let n = end.next_power_of_two().max(256);
            let half = self.inv_freq.len();
            let mut cos = Vec::with_capacity(n * half);
            let mut sin = Vec::with_capacity(n * half);
            for p in 0..n {
                for f in &self.inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
            *guard = Some((
                Tensor::from_vec(cos, (n, half), device)?,
                Tensor::from_vec(sin, (n, half), device)?,
            ));
        }
        match guard.as_ref() {
            Some((cos, sin)) => Ok((cos.narrow(0, pos, t)?, sin.narrow(0, pos, t)?)),
            None => Err(Error::InvalidConfig {
                reason: "RoPE tables could not be built".into(),
            }),
        }
    }
}

/// Llama 3's frequency scaling: long wavelengths divided by `factor`, short kept, a
/// smooth blend between.
fn scale_frequency(freq: f32, scaling: RopeScaling) -> f32 {
    match scaling {
        RopeScaling::None => freq,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position as f32;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// Heads with RoPE in one pass are candle's reshape, transpose, copy and rotation
    /// bit for bit: both pair layouts, one row and several, query and key head
    /// counts, a row narrowed from a batch (a view with an offset), tables narrowed
    /// from larger ones (positions past the first).
    #[test]
    fn rope_heads_are_candles_heads_and_rope() {
        let dev = Device::Cpu;
        let hd = 64;
        let mut seed = 11u32;
        let mut next = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
                })
                .collect()
        };
        let table = |v: Vec<f32>| Tensor::from_vec(v, (40, hd / 2), &dev).unwrap();
        let (cos, sin) = (table(next(40 * hd / 2)), table(next(40 * hd / 2)));
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let mut compared = 0;
        for (t, n, pos) in [(1, 9, 0), (1, 3, 17), (5, 9, 3), (17, 3, 20)] {
            let rows = Tensor::from_vec(next((t + 2) * n * hd), (t + 2, n * hd), &dev).unwrap();
            let x = rows.narrow(0, 1, t).unwrap();
            let (c, s) = (
                cos.narrow(0, pos, t).unwrap(),
                sin.narrow(0, pos, t).unwrap(),
            );
            for interleaved in [true, false] {
                let heads = x
                    .reshape((1, t, n, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let (want, _) = rope_candle(&heads, &heads, &c, &s, interleaved).unwrap();
                let got = rope_heads(&x, n, hd, &c, &s, interleaved).unwrap().unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "t {t} n {n} interleaved {interleaved}"
                );
                compared += t * n * hd;
            }
        }
        assert_eq!(compared, 2 * hd * (9 + 3 + 5 * 9 + 17 * 3));
        // Sizes that do not fit are left to candle's operations.
        let x = Tensor::zeros((2, 9 * hd), candle_core::DType::F32, &dev).unwrap();
        let (c, s) = (cos.narrow(0, 0, 3).unwrap(), sin.narrow(0, 0, 3).unwrap());
        assert!(rope_heads(&x, 9, hd, &c, &s, true).unwrap().is_none());
        assert!(rope_heads(&x, 8, hd, &c, &s, true).unwrap().is_none());
    }

    #[test]
    fn mask_is_causal_after_a_prefix() {
        let m = causal_mask(2, 3, usize::MAX, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0][..4], [0.0, 0.0, 0.0, 0.0]);
        assert_eq!(v[0][4], f32::NEG_INFINITY);
        assert_eq!(v[1], [0.0; 5]);
    }

    fn last_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
        let mut cache = m.new_cache(ids.len());
        m.forward(ids, &mut cache, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn a_sliding_window_hides_what_lies_before_it() {
        // One layer: the last position sees only the last `window` tokens, and RoPE
        // scores depend on relative positions only, so running those tokens alone
        // gives the same logits.
        let one_layer = |window| {
            let mut c = testing::config();
            c.num_layers = 1;
            c.sliding_window = window;
            testing::model_with(c, 0.5)
        };
        let (windowed, full) = (one_layer(Some(4)), one_layer(None));
        let ids = testing::tokens(11);
        let tail = &ids[ids.len() - 4..];
        let expect = last_logits(&windowed, tail);
        assert!(max_diff(&last_logits(&windowed, &ids), &expect) < 1e-4);
        assert!(max_diff(&last_logits(&full, &ids), &expect) > 1e-3);
        // Token by token through the cache (the decode path, one query row) too.
        let mut cache = windowed.new_cache(ids.len());
        let mut last = Vec::new();
        for id in &ids {
            last = windowed
                .forward(&[*id], &mut cache, Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        }
        assert!(max_diff(&last, &expect) < 1e-4);
    }

    #[test]
    fn kv_formats_change_the_cache_bytes_not_the_answer() {
        // Heads of 32: whole Q8_0 blocks.
        let mut c = testing::config();
        (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) = (64, 4, 2, 32);
        let base = testing::model_with(c.clone(), 0.5);
        let ids = testing::tokens(70);
        // A prompt, then decode steps one token at a time.
        let run = |m: &Model, policy: PrunePolicy| -> Vec<f32> {
            let budget = policy.kept().map(|_| 128);
            let mut cache = m.new_pruned_cache(128, budget, policy);
            let mut out = m
                .forward(&ids[..60], &mut cache, Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for id in &ids[60..] {
                out = m
                    .forward(&[*id], &mut cache, Logits::Last)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            }
            assert_eq!(cache.config().format, m.kv_format());
            assert_eq!(cache.used_bytes(), 70 * m.kv_bytes_per_token());
            out
        };
        let want = run(&base, PrunePolicy::None);
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (format, tol) in [
            (KvFormat::F16, 1e-2),
            (KvFormat::BF16, 8e-2),
            // 8 bits per element against the block's largest (the seeded model's
            // random weights amplify it; SmolLM2's perplexity moves by 0.4%).
            (KvFormat::Q8_0, 8e-2),
        ] {
            let mut m = testing::model_with(c.clone(), 0.5);
            m.set_kv_format(format).unwrap();
            assert_eq!(m.kv_format(), format);
            let got = run(&m, PrunePolicy::None);
            let d = max_diff(&got, &want);
            println!("{format}: max logit difference {d} (logits up to {scale})");
            assert!(
                d > 0.0 && d < tol * scale,
                "{format}: {d} (logits up to {scale})"
            );
            // The materialised path (a policy that reads the attention weights)
            // decodes the same rows: the same logits within f32 rounding.
            let hh = PrunePolicy::HeavyHitters {
                budget: 128,
                recent: 32,
            };
            assert_eq!(
                m.attention_memory(hh),
                afo_guard::AttentionMemory::Materialized {
                    decoded_cache: true
                }
            );
            let materialised = run(&m, hh);
            assert!(max_diff(&materialised, &got) < 1e-4 * scale, "{format}");
        }
        // The bytes a token takes: f32 64 x 4 = 256 per head row, Q8_0 two blocks.
        let mut q8 = testing::model_with(c.clone(), 0.5);
        q8.set_kv_format(KvFormat::Q8_0).unwrap();
        assert_eq!(base.kv_bytes_per_token(), 2 * 2 * 2 * 32 * 4);
        assert_eq!(q8.kv_bytes_per_token(), 2 * 2 * 2 * 34);
        assert_eq!(
            base.attention_memory(PrunePolicy::HeavyHitters {
                budget: 8,
                recent: 2
            }),
            afo_guard::AttentionMemory::Materialized {
                decoded_cache: false
            }
        );
        // Heads of 8 cannot be held in Q8_0 blocks: refused with the reason, the
        // format unchanged.
        let mut small = testing::model(0.5);
        let err = small.set_kv_format(KvFormat::Q8_0).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        assert_eq!(small.kv_format(), KvFormat::F32);
        small.set_kv_format(KvFormat::F16).unwrap();
    }

    #[test]
    fn a_pruned_cache_runs_on_the_tokens_it_kept() {
        // One layer: the kept keys and values are what a fresh run over the kept
        // tokens computes (RoPE scores depend on relative positions only).
        let mut c = testing::config();
        c.num_layers = 1;
        let m = testing::model_with(c, 0.5);
        let ids = testing::tokens(40);
        let mut cache = m.new_pruned_cache(64, Some(12), PrunePolicy::SlidingWindow { window: 12 });
        let mut last = Vec::new();
        for id in &ids {
            last = m
                .forward(&[*id], &mut cache, Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(cache.len() <= 12);
        }
        assert_eq!(cache.position(), 40);
        assert!(cache.evicted_tokens() > 0);
        let kept = &ids[ids.len() - cache.len()..];
        assert!(max_diff(&last, &last_logits(&m, kept)) < 1e-4);
        // And it differs from the full context.
        assert!(max_diff(&last, &last_logits(&m, &ids)) > 1e-3);
    }

    #[test]
    fn a_prompt_computes_the_last_layer_for_the_logits_asked_only() {
        // With `Logits::Last`, the last layer's output projection and MLP run on the
        // last row alone: its logits are those of the full pass (up to the order of
        // additions of the one-row kernels), and the cache, written before, is the
        // same, so the next step is the same bit for bit.
        let m = testing::model(0.5);
        let ids = testing::tokens(40);
        let mut all_cache = m.new_cache(48);
        let all: Vec<Vec<f32>> = m
            .forward(&ids, &mut all_cache, Logits::All)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut last_cache = m.new_cache(48);
        let last: Vec<f32> = m
            .forward(&ids, &mut last_cache, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let full_last = all.last().unwrap();
        assert_eq!(last.len(), full_last.len());
        assert!(
            max_diff(&last, full_last) < 1e-4,
            "{}",
            max_diff(&last, full_last)
        );
        // Not the logits of another row.
        assert!(max_diff(&last, &all[all.len() - 2]) > 1e-3);
        assert_eq!(all_cache.len(), last_cache.len());
        let next = |cache: &mut KvCache| -> Vec<f32> {
            m.forward(&[9], cache, Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (next(&mut all_cache), next(&mut last_cache));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        // One token: nothing to leave out, the same as before.
        let mut one = m.new_cache(4);
        let single = m.forward(&ids[..1], &mut one, Logits::Last).unwrap();
        assert_eq!(single.dims(), &[1, testing::VOCAB]);
    }

    #[test]
    fn a_chunk_without_logits_leaves_the_cache_a_forward_leaves() {
        // `extend` stops after the last layer's attention: the cache holds the same
        // keys and values as after `forward`, so the chunk after it computes the same
        // logits bit for bit, for one-token and many-token chunks.
        let m = testing::model(0.5);
        let ids = testing::tokens(30);
        for split in [1, 17] {
            let mut a = m.new_cache(40);
            let mut b = m.new_cache(40);
            m.forward(&ids[..split], &mut a, Logits::Last).unwrap();
            m.extend(&ids[..split], &mut b).unwrap();
            assert_eq!(a.len(), b.len());
            assert_eq!(b.len(), split);
            let rest = |cache: &mut KvCache| -> Vec<f32> {
                m.forward(&ids[split..], cache, Logits::Last)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (x, y) = (rest(&mut a), rest(&mut b));
            assert_eq!(x.len(), testing::VOCAB);
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        // Through the generation loop's trait, and an empty chunk is an error.
        let mut c = m.new_cache(40);
        Decode::extend(&m, &ids[..5], &mut c).unwrap();
        assert_eq!(c.len(), 5);
        assert!(m.extend(&[], &mut c).is_err());
    }

    #[test]
    fn a_batched_step_equals_each_sequence_alone() {
        // Every sequence in the fused kernel, and with the second sequence's policy
        // observing attention (the materialised path, batched with fused ones).
        for mixed in [false, true] {
            a_batched_step_equals_each_sequence_alone_with(mixed);
        }
    }

    fn a_batched_step_equals_each_sequence_alone_with(mixed: bool) {
        let m = testing::model(0.5);
        let prompts = [
            testing::tokens(5),
            testing::tokens(9)[3..].to_vec(),
            vec![7],
        ];
        let next = [11u32, 4, 29];
        let mut alone = Vec::new();
        let mut caches = Vec::new();
        let h2o = PrunePolicy::HeavyHitters {
            budget: 64,
            recent: 8,
        };
        for (s, (p, n)) in prompts.iter().zip(next).enumerate() {
            let mut a = if mixed && s == 1 {
                m.new_pruned_cache(32, Some(64), h2o)
            } else {
                m.new_cache(32)
            };
            m.forward(p, &mut a, Logits::Last).unwrap();
            let mut b = a.clone();
            alone.push(
                m.forward(&[n], &mut a, Logits::Last)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            b.truncate(p.len());
            caches.push(b);
        }
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batched: Vec<Vec<f32>> = m
            .forward_batch(&next, &mut refs)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (a, b) in alone.iter().zip(&batched) {
            assert!(max_diff(a, b) < 1e-4, "mixed {mixed}: {}", max_diff(a, b));
        }
        for (c, p) in caches.iter().zip(&prompts) {
            assert_eq!(c.len(), p.len() + 1);
        }
        assert!(
            m.forward_batch(&next[..2], &mut caches.iter_mut().collect::<Vec<_>>())
                .is_err()
        );
    }

    #[test]
    fn the_fused_kernel_matches_the_materialised_path() {
        // A policy that observes attention runs the materialised path; with a budget
        // the sequence never reaches it prunes nothing, so both see the same keys.
        let m = testing::model(0.5);
        let ids = testing::tokens(37);
        let h2o = PrunePolicy::HeavyHitters {
            budget: 64,
            recent: 8,
        };
        let mut fused = m.new_cache(64);
        let mut materialised = m.new_pruned_cache(64, Some(64), h2o);
        for chunk in [&ids[..29], &ids[29..30], &ids[30..]] {
            let run = |cache: &mut KvCache| {
                m.forward(chunk, cache, Logits::All)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (a, b) = (run(&mut fused), run(&mut materialised));
            assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
        }
    }

    #[test]
    fn windowed_mask_sees_the_last_window_tokens() {
        let m = causal_mask(1, 5, 3, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(v[0], [ninf, ninf, ninf, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn llama3_scaling_keeps_short_and_divides_long_wavelengths() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        };
        assert_eq!(scale_frequency(1.0, s), 1.0);
        let long = 2.0 * std::f32::consts::PI / 100_000.0;
        assert_eq!(scale_frequency(long, s), long / 8.0);
    }
}
