//! The per-sequence KV cache.

use std::ops::Range;

use afo_guard::KvFormat;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::policy::PrunePolicy;

/// The largest finite f16, where [`KvCacheConfig::encode`] saturates f16 rows.
const F16_MAX: f32 = 65_504.0;

/// The shape and limits of a cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCacheConfig {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// The most tokens the cache holds (the model's context, or less).
    pub max_tokens: usize,
    /// Growth granularity, in tokens.
    pub block_tokens: usize,
    /// How keys and values are stored (f32, f16, bf16 or Q8_0 blocks).
    pub format: KvFormat,
    /// The most tokens held at once; above it the cache prunes by `policy`. `None`:
    /// never prune (appending past `max_tokens` is an error).
    pub budget_tokens: Option<usize>,
    /// How to prune when over budget.
    pub policy: PrunePolicy,
}

impl KvCacheConfig {
    /// Bytes one token takes across all layers (keys and values).
    pub fn bytes_per_token(&self) -> u64 {
        afo_guard::kv_bytes_per_token(
            self.layers as u64,
            self.kv_heads as u64,
            self.head_dim as u64,
            self.format,
        )
    }

    /// How a head's key (or value) row is held in the buffers: the element type and
    /// the elements per row. Float formats hold `head_dim` elements of their type;
    /// Q8_0 holds its blocks' bytes (`head_dim / 32 x 34` of `u8`).
    pub fn storage(&self) -> (DType, usize) {
        match self.format {
            KvFormat::F32 => (DType::F32, self.head_dim),
            KvFormat::F16 => (DType::F16, self.head_dim),
            KvFormat::BF16 => (DType::BF16, self.head_dim),
            KvFormat::Q8_0 => (
                DType::U8,
                KvFormat::Q8_0.row_bytes(self.head_dim as u64) as usize,
            ),
        }
    }

    /// Checks that the format can hold rows of `head_dim` (Q8_0: a multiple of 32).
    ///
    /// # Errors
    /// [`Error::Format`] otherwise.
    pub fn validate(&self) -> Result<()> {
        if self.format == KvFormat::Q8_0 && !self.head_dim.is_multiple_of(32) {
            return Err(Error::Format {
                format: self.format,
                reason: format!(
                    "its blocks hold 32 elements, and a head has {} (not a multiple of 32)",
                    self.head_dim
                ),
            });
        }
        Ok(())
    }

    /// Encodes keys or values (`[1, kv_heads, t, head_dim]`, any float type) into the
    /// buffers' layout ([`KvCacheConfig::storage`]). f16 saturates at its largest
    /// finite value (65,504) instead of rounding past it to infinity, which would make
    /// every score of a key (or every output of a value) that reads it NaN; NaN stays
    /// NaN.
    ///
    /// # Errors
    /// [`Error::Format`] for a head size the format cannot hold; tensor errors.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (b, h, t, d) = x.dims4()?;
        if d != self.head_dim {
            return Err(Error::Shape {
                got: x.dims().to_vec(),
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            });
        }
        let (_, width) = self.storage();
        let rows = b * h * t;
        let shape = (b, h, t, width);
        let dev = x.device();
        afo_quant::read_f32(x, |src| -> Result<Tensor> {
            Ok(match self.format {
                // Held as they are: no copy of a contiguous f32 tensor.
                KvFormat::F32 => x.to_dtype(DType::F32)?.contiguous()?,
                KvFormat::F16 => {
                    let mut out = vec![half::f16::ZERO; rows * width];
                    self.encode_rows(src, RowsMut::F16(&mut out))?;
                    Tensor::from_vec(out, shape, dev)?
                }
                KvFormat::BF16 => {
                    let mut out = vec![half::bf16::ZERO; rows * width];
                    self.encode_rows(src, RowsMut::Bf16(&mut out))?;
                    Tensor::from_vec(out, shape, dev)?
                }
                KvFormat::Q8_0 => {
                    let mut out = vec![0u8; rows * width];
                    self.encode_rows(src, RowsMut::Q8_0(&mut out))?;
                    Tensor::from_vec(out, shape, dev)?
                }
            })
        })?
    }

    /// Encodes whole rows of `head_dim` f32 values (`src`) into the same rows in the
    /// buffers' layout (`dst`, of [`KvCacheConfig::storage`]'s type and width): the
    /// one encoding of the cache, which [`KvCacheConfig::encode`] and
    /// [`KvCache::append`] (straight into its buffers) both use. f16 saturates at
    /// 65,504; f16 and bf16 round to nearest even.
    ///
    /// # Errors
    /// [`Error::Format`] when `src` is not whole rows or `dst` not as many rows of the
    /// storage's width (or a head size Q8_0 cannot hold).
    fn encode_rows(&self, src: &[f32], dst: RowsMut<'_>) -> Result<()> {
        use half::slice::HalfFloatSliceExt;
        let (_, width) = self.storage();
        let d = self.head_dim;
        let rows = src.len() / d.max(1);
        let fits = d > 0 && src.len() == rows * d && dst.len() == rows * width;
        if !fits {
            return Err(Error::Format {
                format: self.format,
                reason: format!(
                    "{} values and {} stored elements are not whole rows of {d} and {width}",
                    src.len(),
                    dst.len()
                ),
            });
        }
        let matches = matches!(
            (self.format, &dst),
            (KvFormat::F32, RowsMut::F32(_))
                | (KvFormat::F16, RowsMut::F16(_))
                | (KvFormat::BF16, RowsMut::Bf16(_))
                | (KvFormat::Q8_0, RowsMut::Q8_0(_))
        );
        if !matches {
            return Err(Error::Format {
                format: self.format,
                reason: "rows of another format to encode into".to_string(),
            });
        }
        match dst {
            RowsMut::F32(out) => out.copy_from_slice(src),
            RowsMut::F16(out) => {
                // Rows in range (all but always) convert as they are; a chunk with a
                // value past f16's range is clamped first (NaN stays NaN).
                const CHUNK: usize = 64;
                let mut clamped = [0.0f32; CHUNK];
                for (x, o) in src.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
                    if x.iter().any(|v| v.abs() > F16_MAX) {
                        let buf = &mut clamped[..x.len()];
                        for (b, v) in buf.iter_mut().zip(x) {
                            *b = v.clamp(-F16_MAX, F16_MAX);
                        }
                        o.convert_from_f32_slice(buf);
                    } else {
                        o.convert_from_f32_slice(x);
                    }
                }
            }
            RowsMut::Bf16(out) => out.convert_from_f32_slice(src),
            RowsMut::Q8_0(out) => {
                self.validate()?;
                for (row, o) in src.chunks_exact(d).zip(out.chunks_exact_mut(width)) {
                    afo_quant::kernels::quantize_q8_0(row, o).map_err(|e| Error::Format {
                        format: self.format,
                        reason: e.to_string(),
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Decodes rows held in the buffers' layout (`[1, kv_heads, n, width]`, as
    /// [`KvCache::append`] returns them) to f32 `[1, kv_heads, n, head_dim]`.
    ///
    /// # Errors
    /// [`Error::Format`] for bytes that are not whole rows; tensor errors.
    pub fn decode(&self, stored: &Tensor) -> Result<Tensor> {
        if self.format != KvFormat::Q8_0 {
            return Ok(stored.to_dtype(DType::F32)?);
        }
        let (b, h, n, width) = stored.dims4()?;
        let d = self.head_dim;
        let decode = |bytes: &[u8]| -> Result<Vec<f32>> {
            let mut values = vec![0.0f32; b * h * n * d];
            for (row, out) in bytes.chunks_exact(width).zip(values.chunks_exact_mut(d)) {
                afo_quant::kernels::dequantize_q8_0(row, out).map_err(|e| Error::Format {
                    format: self.format,
                    reason: e.to_string(),
                })?;
            }
            Ok(values)
        };
        // The stored bytes in place when they are one contiguous CPU buffer (the cache's
        // own), otherwise a copy.
        let values = match afo_quant::in_place(stored, decode) {
            Ok(values) => values,
            Err(decode) => decode(&stored.flatten_all()?.to_vec1::<u8>()?),
        }?;
        Ok(Tensor::from_vec(values, (b, h, n, d), stored.device())?)
    }
}

/// Writes `t` tokens' rows (contiguous f32, `[1, kv_heads, t, head_dim]`) into a
/// layer's buffer (`[1, kv_heads, capacity, width]`) from slot `at`, encoded by
/// [`KvCacheConfig::encode_rows`]: candle's way to write into a tensor's storage (it
/// refuses rows that share the buffer's storage).
struct EncodeAt {
    config: KvCacheConfig,
    at: usize,
    t: usize,
}

impl candle_core::InplaceOp2 for EncodeAt {
    fn name(&self) -> &'static str {
        "kv-cache-encode"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
        rows: &candle_core::CpuStorage,
        rows_layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        let c = &self.config;
        let (_, width) = c.storage();
        let d = c.head_dim;
        let (heads, cap) = match *layout.dims() {
            [1, h, cap, w] if h == c.kv_heads && w == width && layout.is_contiguous() => (h, cap),
            _ => candle_core::bail!("a KV buffer of layout {layout:?} for {c:?}"),
        };
        let src = match (rows, rows_layout.contiguous_offsets()) {
            (S::F32(x), Some((lo, hi))) => x.get(lo..hi).unwrap_or_default(),
            _ => candle_core::bail!("KV rows to encode are not contiguous f32"),
        };
        if self.at + self.t > cap || src.len() != heads * self.t * d {
            candle_core::bail!(
                "{} values for {} tokens at slot {} of {cap}",
                src.len(),
                self.t,
                self.at
            );
        }
        let start = layout.start_offset();
        for (h, src) in src.chunks_exact(self.t * d).enumerate() {
            let lo = start + (h * cap + self.at) * width;
            let range = lo..lo + self.t * width;
            let dst = match storage {
                S::F32(x) => x.get_mut(range).map(RowsMut::F32),
                S::F16(x) => x.get_mut(range).map(RowsMut::F16),
                S::BF16(x) => x.get_mut(range).map(RowsMut::Bf16),
                S::U8(x) => x.get_mut(range).map(RowsMut::Q8_0),
                _ => None,
            };
            let Some(dst) = dst else {
                candle_core::bail!("a KV buffer that does not hold {c:?}'s rows");
            };
            c.encode_rows(src, dst)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        Ok(())
    }
}

/// Rows in the buffers' layout, to encode into ([`KvCacheConfig::encode_rows`]).
enum RowsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [half::f16]),
    Bf16(&'a mut [half::bf16]),
    Q8_0(&'a mut [u8]),
}

impl RowsMut<'_> {
    fn len(&self) -> usize {
        match self {
            RowsMut::F32(x) => x.len(),
            RowsMut::F16(x) => x.len(),
            RowsMut::Bf16(x) => x.len(),
            RowsMut::Q8_0(x) => x.len(),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    k: Tensor,
    v: Tensor,
}

/// The per-sequence KV cache. See the crate docs.
///
/// Cloning copies the buffers: appends to one copy never show in another.
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    device: Device,
    layers: Vec<Option<Layer>>,
    capacity: usize,
    len: usize,
    /// Tokens committed since the start (the position of the next one).
    position: usize,
    /// Tokens dropped by pruning so far.
    evicted: usize,
    /// Heavy hitters: attention received by each held token, per layer.
    scores: Vec<Vec<f32>>,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        // candle tensors share storage on clone and `slice_set` writes in place: copy.
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| Layer {
                    k: l.k.copy().unwrap_or_else(|_| l.k.clone()),
                    v: l.v.copy().unwrap_or_else(|_| l.v.clone()),
                })
            })
            .collect();
        Self {
            config: self.config,
            device: self.device.clone(),
            layers,
            capacity: self.capacity,
            len: self.len,
            position: self.position,
            evicted: self.evicted,
            scores: self.scores.clone(),
        }
    }
}

impl KvCache {
    /// An empty cache; nothing is allocated until the first append.
    pub fn new(config: KvCacheConfig, device: &Device) -> Self {
        Self {
            config,
            device: device.clone(),
            layers: vec![None; config.layers],
            capacity: 0,
            len: 0,
            position: 0,
            evicted: 0,
            scores: vec![Vec::new(); config.layers],
        }
    }

    /// The position of the next token: tokens committed since the start, pruned or
    /// not.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Tokens pruned so far.
    pub fn evicted_tokens(&self) -> usize {
        self.evicted
    }

    /// Makes room for `t` new tokens when the budget would be passed, by the policy.
    /// Call it before appending a chunk's keys at any layer. Does nothing without a
    /// budget or when there is room.
    ///
    /// # Errors
    /// [`Error::BudgetTooSmall`] when the policy keeps too much to add `t` tokens.
    pub fn make_room(&mut self, t: usize) -> Result<()> {
        let Some(budget) = self.config.budget_tokens else {
            return Ok(());
        };
        if self.len + t <= budget || self.config.policy == PrunePolicy::None {
            if self.len + t > budget {
                return Err(Error::BudgetTooSmall {
                    budget,
                    kept: self.len,
                    adding: t,
                });
            }
            return Ok(());
        }
        // Keep at most the policy's count, and leave a block of free slots (or the
        // chunk) so that the next steps append without pruning again.
        let slack = self.config.block_tokens.min(budget / 4).max(t);
        let target = budget
            .saturating_sub(slack)
            .min(self.config.policy.kept().unwrap_or(budget));
        if target + t > budget {
            return Err(Error::BudgetTooSmall {
                budget,
                kept: target,
                adding: t,
            });
        }
        let n = self.len;
        for layer in 0..self.config.layers {
            let keep = self.keep(layer, n, target);
            self.compact(layer, &keep)?;
        }
        self.evicted += n - target.min(n);
        self.len = target.min(n);
        Ok(())
    }

    /// Adds attention weights `probs` (`[1, kv_heads, queries, len + t]`, softmaxed,
    /// where `len + t` are the keys [`KvCache::append`] returned) to the attention each
    /// held token has received at `layer`. Only [`PrunePolicy::HeavyHitters`] uses it.
    ///
    /// # Errors
    /// [`Error::Layer`], or a shape that does not match.
    pub fn observe(&mut self, layer: usize, probs: &Tensor) -> Result<()> {
        if !self.config.policy.needs_attention() {
            return Ok(());
        }
        let layers = self.config.layers;
        let acc = self
            .scores
            .get_mut(layer)
            .ok_or(Error::Layer { layer, layers })?;
        let received: Vec<f32> = probs
            .to_dtype(DType::F32)?
            .sum(2)?
            .sum(1)?
            .flatten_all()?
            .to_vec1()?;
        if acc.len() < received.len() {
            acc.resize(received.len(), 0.0);
        }
        for (a, r) in acc.iter_mut().zip(&received) {
            *a += r;
        }
        Ok(())
    }

    /// Indices of the held tokens to keep at `layer`, ascending.
    fn keep(&self, layer: usize, n: usize, target: usize) -> Vec<usize> {
        if target >= n {
            return (0..n).collect();
        }
        match self.config.policy {
            PrunePolicy::None | PrunePolicy::SlidingWindow { .. } => (n - target..n).collect(),
            PrunePolicy::Sinks { sink_tokens, .. } => {
                let sinks = sink_tokens.min(target);
                (0..sinks).chain(n - (target - sinks)..n).collect()
            }
            PrunePolicy::HeavyHitters { recent, .. } => {
                let recent = recent.min(target);
                let old = n - recent;
                let scores = &self.scores[layer];
                let mut idx: Vec<usize> = (0..old).collect();
                idx.sort_by(|&a, &b| {
                    let (sa, sb) = (
                        scores.get(a).copied().unwrap_or(0.0),
                        scores.get(b).copied().unwrap_or(0.0),
                    );
                    sb.total_cmp(&sa).then(a.cmp(&b))
                });
                idx.truncate(target - recent);
                idx.sort_unstable();
                idx.extend(old..n);
                idx
            }
        }
    }

    /// Moves the tokens `keep` (ascending) of `layer` to the front of its buffers.
    fn compact(&mut self, layer: usize, keep: &[usize]) -> Result<()> {
        if let Some(scores) = self.scores.get_mut(layer)
            && !scores.is_empty()
        {
            *scores = keep
                .iter()
                .map(|&i| scores.get(i).copied().unwrap_or(0.0))
                .collect();
        }
        let Some(Some(buffers)) = self.layers.get_mut(layer) else {
            return Ok(());
        };
        let idx = Tensor::new(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &self.device,
        )?;
        let k = buffers.k.index_select(&idx, 2)?;
        let v = buffers.v.index_select(&idx, 2)?;
        buffers.k.slice_set(&k, 2, 0)?;
        buffers.v.slice_set(&v, 2, 0)?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Tokens held (committed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the buffers can hold before growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated (all layers, keys and values).
    pub fn bytes(&self) -> u64 {
        self.capacity as u64 * self.config.bytes_per_token()
    }

    /// Bytes used by the tokens held.
    pub fn used_bytes(&self) -> u64 {
        self.len as u64 * self.config.bytes_per_token()
    }

    /// Writes `k` and `v` (`[1, kv_heads, t, head_dim]`) for `layer` after the tokens
    /// held, and returns the keys and values of all `len + t` positions, as the
    /// buffers hold them (`[1, kv_heads, len + t, width]` in the layout of
    /// [`KvCacheConfig::storage`]; [`KvCacheConfig::decode`] gives f32). Call it for
    /// every layer, then [`KvCache::commit`] with `t`.
    ///
    /// # Errors
    /// [`Error::Full`] past `max_tokens`, [`Error::Shape`], [`Error::Layer`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let end = self.write_at(layer, 0, k, v)?;
        let buffers = self.layers[layer].as_ref().ok_or(Error::Layer {
            layer,
            layers: self.config.layers,
        })?;
        Ok((buffers.k.narrow(2, 0, end)?, buffers.v.narrow(2, 0, end)?))
    }

    /// Writes `k` and `v` (`[1, kv_heads, t, head_dim]`) for `layer` at `offset` slots
    /// after the tokens held (growing the buffers as needed, which keeps only the
    /// committed tokens: see [`KvCache::reserve`]), and returns the end of what was
    /// written (`len + offset + t`). Nothing is committed.
    pub(crate) fn write_at(
        &mut self,
        layer: usize,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<usize> {
        let c = self.config;
        let (b, h, _, d) = k.dims4().map_err(|_| self.shape_err(k))?;
        if b != 1 || h != c.kv_heads || d != c.head_dim || v.dims() != k.dims() {
            return Err(self.shape_err(if v.dims() != k.dims() { v } else { k }));
        }
        let t = k.dim(2)?;
        if !self.device.is_cpu() {
            let (k, v) = (c.encode(k)?, c.encode(v)?);
            return self.write_stored_at(layer, offset, &k, &v);
        }
        // On the CPU the rows are encoded straight into the buffers: no encoded copy
        // in between (a decode step's append was two small tensors, an allocation
        // and a copy each, for two rows a head).
        let (at, buffers) = self.prepare_write(layer, offset, t)?;
        for (buffer, x) in [(&buffers.k, k), (&buffers.v, v)] {
            let x = if x.dtype() == DType::F32 && x.is_contiguous() {
                x.clone()
            } else {
                x.to_dtype(DType::F32)?.contiguous()?
            };
            buffer.inplace_op2(&x, &EncodeAt { config: c, at, t })?;
        }
        Ok(at + t)
    }

    /// [`KvCache::write_at`] for rows already in the buffers' layout
    /// ([`KvCacheConfig::storage`]): a prefix block's copies.
    pub(crate) fn write_stored_at(
        &mut self,
        layer: usize,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<usize> {
        let c = self.config;
        let (dtype, width) = c.storage();
        let (b, h, t, d) = k.dims4().map_err(|_| self.shape_err(k))?;
        if b != 1
            || h != c.kv_heads
            || d != width
            || v.dims() != k.dims()
            || k.dtype() != dtype
            || v.dtype() != dtype
        {
            return Err(self.shape_err(if v.dims() != k.dims() { v } else { k }));
        }
        let (at, buffers) = self.prepare_write(layer, offset, t)?;
        buffers.k.slice_set(&k.contiguous()?, 2, at)?;
        buffers.v.slice_set(&v.contiguous()?, 2, at)?;
        Ok(at + t)
    }

    /// Checks a write of `t` rows for `layer` at `offset` slots after the tokens held,
    /// grows the buffers as needed (and makes the layer's on its first write), and
    /// returns the first slot to write and the layer's buffers.
    fn prepare_write(&mut self, layer: usize, offset: usize, t: usize) -> Result<(usize, &Layer)> {
        let c = self.config;
        let (dtype, width) = c.storage();
        if layer >= c.layers {
            return Err(Error::Layer {
                layer,
                layers: c.layers,
            });
        }
        let at = self.len + offset;
        let end = at + t;
        let limit = c
            .budget_tokens
            .map_or(c.max_tokens, |b| b.min(c.max_tokens));
        if end > limit {
            return Err(Error::Full {
                len: self.len,
                adding: offset + t,
                max_tokens: limit,
            });
        }
        if end > self.capacity {
            self.grow(end)?;
        }
        let buffers = match &mut self.layers[layer] {
            Some(l) => l,
            slot => slot.insert(Layer {
                k: Tensor::zeros((1, c.kv_heads, self.capacity, width), dtype, &self.device)?,
                v: Tensor::zeros((1, c.kv_heads, self.capacity, width), dtype, &self.device)?,
            }),
        };
        Ok((at, buffers))
    }

    /// Asks the CPU to bring into its caches the rows `rows` of kv heads `heads` of
    /// `layer`, keys and values ([`afo_quant::kernels::prefetch_bytes`]): the slots a
    /// decode step's append is about to write (`len..len + t`: lines nothing has
    /// touched since the buffers were allocated, each write otherwise waiting for its
    /// line from memory), or the first rows its attention reads. A hint: it changes
    /// nothing, and asks for nothing outside the buffers (before the layer's first
    /// write, or rows past the capacity).
    pub fn prefetch(&self, layer: usize, heads: Range<usize>, rows: Range<usize>) {
        let Some(Some(buffers)) = self.layers.get(layer) else {
            return;
        };
        let rows = rows.start..rows.end.min(self.capacity);
        let heads = heads.start..heads.end.min(self.config.kv_heads);
        if rows.is_empty() {
            return;
        }
        let (_, width) = self.config.storage();
        for buffer in [&buffers.k, &buffers.v] {
            let (storage, layout) = buffer.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                continue;
            };
            let (base, size) = match cpu {
                candle_core::CpuStorage::F32(v) => (v.as_ptr().cast::<u8>(), 4),
                candle_core::CpuStorage::F16(v) => (v.as_ptr().cast::<u8>(), 2),
                candle_core::CpuStorage::BF16(v) => (v.as_ptr().cast::<u8>(), 2),
                candle_core::CpuStorage::U8(v) => (v.as_ptr(), 1),
                _ => continue,
            };
            for h in heads.clone() {
                let at = layout.start_offset() + (h * self.capacity + rows.start) * width;
                afo_quant::kernels::prefetch_bytes(
                    base.wrapping_add(at * size),
                    rows.len() * width * size,
                );
            }
        }
    }

    /// Makes room for `t` tokens after the ones held without growing again (growing
    /// keeps only the committed tokens: reserve before writing at offsets).
    pub(crate) fn reserve(&mut self, t: usize) -> Result<()> {
        let c = self.config;
        let end = self.len + t;
        let limit = c
            .budget_tokens
            .map_or(c.max_tokens, |b| b.min(c.max_tokens));
        if end > limit {
            return Err(Error::Full {
                len: self.len,
                adding: t,
                max_tokens: limit,
            });
        }
        if end > self.capacity {
            self.grow(end)?;
        }
        Ok(())
    }

    /// Views of the keys and values held at `layer` (`[1, kv_heads, len, width]`, the
    /// buffers' layout);
    /// `None` before the layer's first append. The views share the cache's buffers:
    /// copy them before keeping them past the next write.
    pub(crate) fn held(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let layers = self.config.layers;
        match self
            .layers
            .get(layer)
            .ok_or(Error::Layer { layer, layers })?
        {
            Some(l) if self.len > 0 => Ok(Some((
                l.k.narrow(2, 0, self.len)?,
                l.v.narrow(2, 0, self.len)?,
            ))),
            _ => Ok(None),
        }
    }

    /// Marks `t` appended tokens as held (after every layer has appended them).
    ///
    /// # Errors
    /// [`Error::Full`] if that passes the capacity.
    pub fn commit(&mut self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::Full {
                len: self.len,
                adding: t,
                max_tokens: self.config.max_tokens,
            });
        }
        self.len += t;
        self.position += t;
        for s in self.scores.iter_mut().filter(|s| !s.is_empty()) {
            s.resize(self.len, 0.0);
        }
        Ok(())
    }

    /// Keeps only the first `n` tokens (the buffers stay allocated). On a pruned
    /// cache the position moves back by as many tokens.
    pub fn truncate(&mut self, n: usize) {
        let dropped = self.len.saturating_sub(n);
        self.len -= dropped;
        self.position -= dropped;
        for s in &mut self.scores {
            s.truncate(self.len);
        }
    }

    /// Drops every token and frees the buffers.
    pub fn reset(&mut self) {
        self.len = 0;
        self.position = 0;
        self.evicted = 0;
        self.capacity = 0;
        self.layers.iter_mut().for_each(|l| *l = None);
        self.scores.iter_mut().for_each(Vec::clear);
    }

    fn grow(&mut self, needed: usize) -> Result<()> {
        let c = self.config;
        let block = c.block_tokens.max(1);
        let doubled = (self.capacity * 2).max(needed);
        let new_cap = doubled.div_ceil(block) * block;
        let limit = c
            .budget_tokens
            .map_or(c.max_tokens, |b| b.min(c.max_tokens));
        let new_cap = new_cap.min(limit).max(needed);
        for layer in self.layers.iter_mut().flatten() {
            let (dtype, width) = c.storage();
            let k = Tensor::zeros((1, c.kv_heads, new_cap, width), dtype, &self.device)?;
            let v = Tensor::zeros((1, c.kv_heads, new_cap, width), dtype, &self.device)?;
            if self.len > 0 {
                k.slice_set(&layer.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                v.slice_set(&layer.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            *layer = Layer { k, v };
        }
        tracing::trace!(from = self.capacity, to = new_cap, "KV cache grown");
        self.capacity = new_cap;
        Ok(())
    }

    fn shape_err(&self, t: &Tensor) -> Error {
        Error::Shape {
            got: t.dims().to_vec(),
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize) -> KvCacheConfig {
        KvCacheConfig {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
            max_tokens: max,
            block_tokens: 8,
            format: KvFormat::F32,
            budget_tokens: None,
            policy: PrunePolicy::None,
        }
    }

    fn tok(t: usize, base: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * t * 4).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, (1, 2, t, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn f16_rows_saturate_instead_of_overflowing() {
        let c = KvCacheConfig {
            format: KvFormat::F16,
            ..config(8)
        };
        let x = Tensor::from_vec(
            vec![1e6f32, -1e6, 65_504.0, 1.5, -70_000.0, 0.0, 3e38, -2.25],
            (1, 2, 1, 4),
            &Device::Cpu,
        )
        .unwrap();
        let back: Vec<f32> = c
            .decode(&c.encode(&x).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            back,
            [
                65_504.0, -65_504.0, 65_504.0, 1.5, -65_504.0, 0.0, 65_504.0, -2.25
            ]
        );
    }

    #[test]
    fn appends_hold_the_encoded_rows_in_every_format() {
        // Rows written straight into the buffers are the bits `encode` gives, for
        // every format, whatever the input's layout and type (a transposed view, f16
        // values), and f16 saturates in the buffers too.
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..2 * 3 * 32)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
            .collect();
        let mut values2 = values.clone();
        values2[5] = 1e6;
        values2[70] = -3e5;
        for format in [KvFormat::F32, KvFormat::F16, KvFormat::BF16, KvFormat::Q8_0] {
            let c = KvCacheConfig {
                layers: 1,
                kv_heads: 2,
                head_dim: 32,
                max_tokens: 64,
                block_tokens: 4,
                format,
                budget_tokens: None,
                policy: PrunePolicy::None,
            };
            let a = Tensor::from_vec(values.clone(), (1, 2, 3, 32), &dev).unwrap();
            // The same logical values through a transposed (non-contiguous) view.
            let b = Tensor::from_vec(values2.clone(), (1, 3, 2, 32), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let f16_in = a.to_dtype(DType::F16).unwrap();
            let mut cache = KvCache::new(c, &dev);
            cache.append(0, &a, &b).unwrap();
            cache.commit(3).unwrap();
            let (k, v) = cache.append(0, &f16_in, &a).unwrap();
            let bytes = |t: &Tensor| -> Vec<f32> {
                c.decode(&t.contiguous().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let want_k =
                Tensor::cat(&[c.encode(&a).unwrap(), c.encode(&f16_in).unwrap()], 2).unwrap();
            let want_v = Tensor::cat(&[c.encode(&b).unwrap(), c.encode(&a).unwrap()], 2).unwrap();
            assert_eq!(bytes(&k), bytes(&want_k), "{format}: keys");
            assert_eq!(bytes(&v), bytes(&want_v), "{format}: values");
            // And they are the input's values, to the format's precision.
            let held = bytes(&k.narrow(2, 0, 3).unwrap());
            let tol = match format {
                KvFormat::F32 => 0.0,
                KvFormat::F16 => 2f32.powi(-11),
                KvFormat::BF16 => 2f32.powi(-8),
                KvFormat::Q8_0 => 1.0 / 127.0,
            };
            for (got, want) in held.iter().zip(&values) {
                assert!(
                    (got - want).abs() <= tol * 18.5,
                    "{format}: {got} for {want}"
                );
            }
            if format == KvFormat::F16 {
                let held = bytes(&v.narrow(2, 0, 3).unwrap());
                let max = held.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(max, 65_504.0, "saturated, not infinite");
            }
            if format == KvFormat::F32 {
                let got: Vec<f32> = k
                    .narrow(2, 0, 3)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got, values, "f32 rows are copied as they are");
            }
        }
    }

    #[test]
    fn appends_grow_in_blocks_and_keep_content() {
        let mut cache = KvCache::new(config(100), &Device::Cpu);
        let mut all = Vec::new();
        for step in 0..20 {
            let t = if step == 0 { 5 } else { 1 };
            let k = tok(t, step as f32 * 100.0);
            for layer in 0..2 {
                let (ks, vs) = cache.append(layer, &k, &k).unwrap();
                assert_eq!(ks.dims(), [1, 2, cache.len() + t, 4]);
                assert_eq!(vs.dims(), ks.dims());
            }
            cache.commit(t).unwrap();
            all.push(k);
            assert_eq!(cache.capacity() % 8, 0);
            assert!(cache.capacity() >= cache.len());
        }
        assert_eq!(cache.len(), 24);
        let want = Tensor::cat(&all, 2).unwrap();
        let (ks, _) = cache.append(0, &tok(1, 0.0), &tok(1, 0.0)).unwrap();
        let got = ks.narrow(2, 0, 24).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert_eq!(cache.bytes(), cache.capacity() as u64 * 2 * 2 * 2 * 4 * 4);
    }

    #[test]
    fn refuses_to_pass_capacity() {
        let mut cache = KvCache::new(config(6), &Device::Cpu);
        cache.append(0, &tok(5, 0.0), &tok(5, 0.0)).unwrap();
        cache.append(1, &tok(5, 0.0), &tok(5, 0.0)).unwrap();
        cache.commit(5).unwrap();
        let err = cache.append(0, &tok(2, 0.0), &tok(2, 0.0)).unwrap_err();
        assert!(err.to_string().contains("capacity of 6"), "{err}");
        assert!(cache.capacity() <= 6);
    }

    #[test]
    fn truncate_and_reset() {
        let mut cache = KvCache::new(config(50), &Device::Cpu);
        for layer in 0..2 {
            cache.append(layer, &tok(10, 0.0), &tok(10, 0.0)).unwrap();
        }
        cache.commit(10).unwrap();
        cache.truncate(4);
        assert_eq!(cache.len(), 4);
        let (ks, _) = cache.append(0, &tok(1, 9.0), &tok(1, 9.0)).unwrap();
        assert_eq!(ks.dims(), [1, 2, 5, 4]);
        cache.reset();
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    /// Appends `n` one-token steps whose keys hold their position, pruning as needed.
    fn run(cache: &mut KvCache, n: usize) {
        for p in 0..n {
            cache.make_room(1).unwrap();
            let k = Tensor::full(p as f32, (1, 2, 1, 4), &Device::Cpu).unwrap();
            for layer in 0..2 {
                let (ks, _) = cache.append(layer, &k, &k).unwrap();
                // H2O: token 3 gets all the attention.
                let len = ks.dim(2).unwrap();
                let probs: Vec<f32> = (0..2 * len)
                    .map(|i| if i % len == 3 { 1.0 } else { 0.0 })
                    .collect();
                let probs = Tensor::from_vec(probs, (1, 2, 1, len), &Device::Cpu).unwrap();
                cache.observe(layer, &probs).unwrap();
            }
            cache.commit(1).unwrap();
        }
    }

    fn held(cache: &mut KvCache) -> Vec<f32> {
        let t = Tensor::full(-1f32, (1, 2, 1, 4), &Device::Cpu).unwrap();
        let (ks, _) = cache.append(0, &t, &t).unwrap();
        let n = ks.dim(2).unwrap() - 1;
        let v: Vec<f32> = ks
            .narrow(2, 0, n)
            .unwrap()
            .i((0, 0, .., 0))
            .unwrap()
            .to_vec1()
            .unwrap();
        v
    }

    use candle_core::IndexOp;

    #[test]
    fn policies_keep_what_they_promise_within_the_budget() {
        let budget = 16;
        let with = |policy| {
            let mut c = config(1000);
            c.budget_tokens = Some(budget);
            c.policy = policy;
            let mut cache = KvCache::new(c, &Device::Cpu);
            run(&mut cache, 50);
            assert!(
                cache.len() <= budget && cache.capacity() <= budget,
                "{policy}"
            );
            assert_eq!(cache.position(), 50);
            assert_eq!(cache.evicted_tokens() + cache.len(), 50);
            assert!(cache.bytes() <= budget as u64 * cache.config().bytes_per_token());
            held(&mut cache)
        };
        let w = with(PrunePolicy::SlidingWindow { window: 12 });
        // The most recent tokens, in order, ending with the last one.
        assert_eq!(*w.last().unwrap(), 49.0);
        assert!(w.windows(2).all(|p| p[1] == p[0] + 1.0), "{w:?}");
        let s = with(PrunePolicy::Sinks {
            sink_tokens: 2,
            window: 10,
        });
        assert_eq!(&s[..2], &[0.0, 1.0], "{s:?}");
        assert_eq!(*s.last().unwrap(), 49.0);
        let h = with(PrunePolicy::HeavyHitters {
            budget: 12,
            recent: 4,
        });
        assert!(h.contains(&3.0), "the heavy hitter is kept: {h:?}");
        assert_eq!(*h.last().unwrap(), 49.0);
        // Without a policy, the budget is a hard limit.
        let mut c = config(1000);
        c.budget_tokens = Some(4);
        let mut cache = KvCache::new(c, &Device::Cpu);
        cache.make_room(4).unwrap();
        assert!(matches!(
            cache.make_room(5),
            Err(Error::BudgetTooSmall { .. })
        ));
    }

    #[test]
    fn prefetching_any_rows_changes_nothing() {
        for format in [KvFormat::F32, KvFormat::F16, KvFormat::BF16, KvFormat::Q8_0] {
            let mut c = config(64);
            c.head_dim = 32;
            c.format = format;
            let mut cache = KvCache::new(c, &Device::Cpu);
            // Before any buffer exists, and for a layer that does not exist.
            cache.prefetch(0, 0..2, 0..8);
            cache.prefetch(99, 0..2, 0..8);
            let rows =
                |p: usize| Tensor::full(p as f32 + 0.5, (1, 2, 1, 32), &Device::Cpu).unwrap();
            for p in 0..5 {
                for layer in 0..c.layers {
                    cache.prefetch(layer, 0..2, cache.len()..cache.len() + 1);
                    cache.append(layer, &rows(p), &rows(p)).unwrap();
                }
                cache.commit(1).unwrap();
            }
            let before: Vec<Vec<f32>> = (0..c.layers)
                .map(|l| {
                    let (k, _) = cache.held(l).unwrap().unwrap();
                    c.decode(&k)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            // Inside, past the capacity, past the heads, empty and reversed ranges.
            for (heads, range) in [
                (0..2, 0..5),
                (0..9, 0..10_000),
                (1..2, 3..usize::MAX),
                (0..2, 4..4),
                #[allow(clippy::reversed_empty_ranges)] // On purpose: empty both ways.
                (2..0, 5..1),
            ] {
                for layer in 0..c.layers {
                    cache.prefetch(layer, heads.clone(), range.clone());
                }
            }
            for (l, want) in before.iter().enumerate() {
                let (k, _) = cache.held(l).unwrap().unwrap();
                let got: Vec<f32> = c
                    .decode(&k)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(&got, want, "{format:?} layer {l}");
                assert_eq!(got.len(), 5 * 2 * 32);
            }
            // The cache still takes rows where they belong.
            cache.append(0, &rows(9), &rows(9)).unwrap();
            assert_eq!(cache.len(), 5);
        }
    }

    #[test]
    fn clones_do_not_share_buffers() {
        let mut a = KvCache::new(config(50), &Device::Cpu);
        for layer in 0..2 {
            a.append(layer, &tok(3, 0.0), &tok(3, 0.0)).unwrap();
        }
        a.commit(3).unwrap();
        let mut b = a.clone();
        a.append(0, &tok(1, 500.0), &tok(1, 500.0)).unwrap();
        let (kb, _) = b.append(0, &tok(1, 7.0), &tok(1, 7.0)).unwrap();
        let (ka, _) = a.append(0, &tok(1, 500.0), &tok(1, 500.0)).unwrap();
        let last = |k: &Tensor| -> f32 { k.i((0, 0, 3, 0)).unwrap().to_scalar().unwrap() };
        assert_eq!((last(&ka), last(&kb)), (500.0, 7.0));
    }

    #[test]
    fn q8_0_caches_hold_blocks_and_decode_within_half_a_step() {
        let mut c = config(100);
        c.head_dim = 64;
        c.format = KvFormat::Q8_0;
        let mut cache = KvCache::new(c, &Device::Cpu);
        let rows = |t: usize, base: f32| {
            let data: Vec<f32> = (0..2 * t * 64)
                .map(|i| ((i as f32 * 0.37 + base).sin()) * (1.0 + (i % 7) as f32))
                .collect();
            Tensor::from_vec(data, (1, 2, t, 64), &Device::Cpu).unwrap()
        };
        let mut all = Vec::new();
        for step in 0..12 {
            let t = if step == 0 { 9 } else { 1 };
            let k = rows(t, step as f32);
            for layer in 0..2 {
                let (ks, vs) = cache.append(layer, &k, &k).unwrap();
                // Two blocks of 34 bytes per row of 64.
                assert_eq!(ks.dims(), [1, 2, cache.len() + t, 68]);
                assert_eq!((ks.dtype(), vs.dims()), (DType::U8, ks.dims()));
            }
            cache.commit(t).unwrap();
            all.push(k);
        }
        let want = Tensor::cat(&all, 2).unwrap();
        let (held, _) = cache.held(0).unwrap().unwrap();
        let got = c.decode(&held).unwrap();
        assert_eq!(got.dims(), [1, 2, 20, 64]);
        let (w, g): (Vec<f32>, Vec<f32>) = (
            want.flatten_all().unwrap().to_vec1().unwrap(),
            got.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (bw, bg) in w.chunks(32).zip(g.chunks(32)) {
            let amax = bw.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (x, y) in bw.iter().zip(bg) {
                assert!(
                    (x - y).abs() <= amax / 254.0 + amax * 2f32.powi(-11),
                    "{x} vs {y}"
                );
            }
        }
        // Bytes are the format's: 2 layers x 2 (k, v) x 2 heads x 68 per token.
        assert_eq!(c.bytes_per_token(), 2 * 2 * 2 * 68);
        assert_eq!(cache.bytes(), cache.capacity() as u64 * 2 * 2 * 2 * 68);
        let f32_cache = KvCacheConfig {
            format: KvFormat::F32,
            ..c
        };
        assert!(c.bytes_per_token() * 3 < f32_cache.bytes_per_token());
        // A clone copies the blocks; pruning moves them like any rows.
        let copy = cache.clone();
        assert_eq!(
            copy.held(1)
                .unwrap()
                .unwrap()
                .0
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap(),
            cache
                .held(1)
                .unwrap()
                .unwrap()
                .0
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
        );
    }

    #[test]
    fn q8_0_needs_whole_blocks_per_head() {
        let mut c = config(10);
        c.format = KvFormat::Q8_0; // head_dim 4
        assert!(matches!(c.validate(), Err(Error::Format { .. })));
        let mut cache = KvCache::new(c, &Device::Cpu);
        let err = cache.append(0, &tok(1, 0.0), &tok(1, 0.0)).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        c.head_dim = 96;
        assert!(c.validate().is_ok());
        assert_eq!(c.storage(), (DType::U8, 3 * 34));
    }

    #[test]
    fn pruning_a_q8_0_cache_keeps_the_chosen_rows() {
        let mut c = config(1000);
        c.head_dim = 32;
        c.format = KvFormat::Q8_0;
        c.budget_tokens = Some(16);
        c.policy = PrunePolicy::SlidingWindow { window: 12 };
        let mut cache = KvCache::new(c, &Device::Cpu);
        for p in 0..40 {
            cache.make_room(1).unwrap();
            // Position p in every element: Q8_0 holds small integers exactly.
            let k = Tensor::full((p % 100) as f32, (1, 2, 1, 32), &Device::Cpu).unwrap();
            for layer in 0..2 {
                cache.append(layer, &k, &k).unwrap();
            }
            cache.commit(1).unwrap();
        }
        let (k, _) = cache.held(0).unwrap().unwrap();
        let first: Vec<f32> = c
            .decode(&k)
            .unwrap()
            .i((0, 1, .., 0))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(first.len() <= 16);
        let want: Vec<f32> = (40 - first.len()..40).map(|p| p as f32).collect();
        for (a, b) in first.iter().zip(&want) {
            assert!((a - b).abs() <= b / 254.0 + b * 2f32.powi(-11), "{first:?}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut cache = KvCache::new(config(50), &Device::Cpu);
        let bad = Tensor::zeros((1, 3, 1, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            cache.append(0, &bad, &bad),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            cache.append(5, &tok(1, 0.0), &tok(1, 0.0)),
            Err(Error::Layer { .. })
        ));
    }
}
