//! Byte-budgeted KV cache for afo.
//!
//! [`KvCache`] is the per-sequence key/value cache of a decoder: one pair of buffers
//! per layer, shaped `[1, kv_heads, capacity, head_dim]`, preallocated in blocks of
//! [`KvCacheConfig::block_tokens`] and grown geometrically, so appending a token writes
//! only that token (no copy of the whole cache per step). [`KvCache::append`] returns
//! views of the keys and values so far; [`KvCache::truncate`] drops the tail (prefix
//! reuse); [`KvCache::bytes`] is the memory held. A cache refuses to grow past its
//! token capacity with a clear error rather than silently dropping context.
//!
//! Pruning policies (sliding window, attention sinks, heavy hitters) and the prefix
//! cache are planned; they are not exposed until they work.
//!
//! # Example
//!
//! ```
//! use afo_kvcache::{KvCache, KvCacheConfig};
//! use candle_core::{DType, Device, Tensor};
//!
//! # fn main() -> Result<(), afo_kvcache::Error> {
//! let config = KvCacheConfig { layers: 2, kv_heads: 3, head_dim: 64, max_tokens: 1024,
//!                              block_tokens: 32, dtype: DType::F32 };
//! let mut cache = KvCache::new(config, &Device::Cpu);
//! let k = Tensor::zeros((1, 3, 5, 64), DType::F32, &Device::Cpu)?;
//! let (keys, values) = cache.append(0, &k, &k)?;
//! assert_eq!(keys.dims(), [1, 3, 5, 64]);
//! cache.append(1, &k, &k)?;
//! cache.commit(5)?;
//! assert_eq!(cache.len(), 5);
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! None.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

use candle_core::{DType, Device, Tensor};

/// Everything that can go wrong in the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Appending would pass the cache's token capacity.
    #[error(
        "KV cache full: {len} + {adding} tokens would pass its capacity of {max_tokens} tokens"
    )]
    Full {
        /// Tokens held.
        len: usize,
        /// Tokens being added.
        adding: usize,
        /// The capacity.
        max_tokens: usize,
    },
    /// A layer index is out of range.
    #[error("layer {layer} is out of range (the cache has {layers} layers)")]
    Layer {
        /// The index.
        layer: usize,
        /// Layers in the cache.
        layers: usize,
    },
    /// Keys or values have an unexpected shape.
    #[error(
        "KV shape {got:?} does not fit the cache (expected [1, {kv_heads}, tokens, {head_dim}])"
    )]
    Shape {
        /// The shape given.
        got: Vec<usize>,
        /// KV heads.
        kv_heads: usize,
        /// Head dimension.
        head_dim: usize,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// Storage dtype (f32, f16 or bf16).
    pub dtype: DType,
}

impl KvCacheConfig {
    /// Bytes one token takes across all layers (keys and values).
    pub fn bytes_per_token(&self) -> u64 {
        (self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()) as u64
    }
}

#[derive(Debug, Clone)]
struct Layer {
    k: Tensor,
    v: Tensor,
}

/// The per-sequence KV cache. See the crate docs.
#[derive(Debug, Clone)]
pub struct KvCache {
    config: KvCacheConfig,
    device: Device,
    layers: Vec<Option<Layer>>,
    capacity: usize,
    len: usize,
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
        }
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
    /// held, and returns the keys and values of all `len + t` positions. Call it for
    /// every layer, then [`KvCache::commit`] with `t`.
    ///
    /// # Errors
    /// [`Error::Full`] past `max_tokens`, [`Error::Shape`], [`Error::Layer`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.config;
        let (b, h, t, d) = k.dims4().map_err(|_| self.shape_err(k))?;
        if b != 1 || h != c.kv_heads || d != c.head_dim || v.dims() != k.dims() {
            return Err(self.shape_err(if v.dims() != k.dims() { v } else { k }));
        }
        if layer >= c.layers {
            return Err(Error::Layer {
                layer,
                layers: c.layers,
            });
        }
        let end = self.len + t;
        if end > c.max_tokens {
            return Err(Error::Full {
                len: self.len,
                adding: t,
                max_tokens: c.max_tokens,
            });
        }
        if end > self.capacity {
            self.grow(end)?;
        }
        let buffers = match &mut self.layers[layer] {
            Some(l) => l,
            slot => slot.insert(Layer {
                k: Tensor::zeros(
                    (1, c.kv_heads, self.capacity, c.head_dim),
                    c.dtype,
                    &self.device,
                )?,
                v: Tensor::zeros(
                    (1, c.kv_heads, self.capacity, c.head_dim),
                    c.dtype,
                    &self.device,
                )?,
            }),
        };
        buffers
            .k
            .slice_set(&k.to_dtype(c.dtype)?.contiguous()?, 2, self.len)?;
        buffers
            .v
            .slice_set(&v.to_dtype(c.dtype)?.contiguous()?, 2, self.len)?;
        Ok((buffers.k.narrow(2, 0, end)?, buffers.v.narrow(2, 0, end)?))
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
        Ok(())
    }

    /// Keeps only the first `n` tokens (the buffers stay allocated).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Drops every token and frees the buffers.
    pub fn reset(&mut self) {
        self.len = 0;
        self.capacity = 0;
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    fn grow(&mut self, needed: usize) -> Result<()> {
        let c = self.config;
        let block = c.block_tokens.max(1);
        let doubled = (self.capacity * 2).max(needed);
        let new_cap = doubled.div_ceil(block) * block;
        let new_cap = new_cap.min(c.max_tokens).max(needed);
        for layer in self.layers.iter_mut().flatten() {
            let k = Tensor::zeros((1, c.kv_heads, new_cap, c.head_dim), c.dtype, &self.device)?;
            let v = Tensor::zeros((1, c.kv_heads, new_cap, c.head_dim), c.dtype, &self.device)?;
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
            dtype: DType::F32,
        }
    }

    fn tok(t: usize, base: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * t * 4).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, (1, 2, t, 4), &Device::Cpu).unwrap()
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
