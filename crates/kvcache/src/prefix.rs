//! The prefix cache: the keys and values of shared prompt prefixes, kept across
//! requests in blocks.
//!
//! A prompt is cut into blocks of [`PrefixCacheConfig::block_tokens`] tokens. Block
//! `i` is keyed by a chained hash: the hash of block `i - 1` (or, for the first block,
//! the caller's [`Salt`]: the model, the weights' scheme, the images of the prompt)
//! and block `i`'s tokens. Equal keys therefore mean an equal salt and an equal
//! prompt up to the end of the block; each entry also keeps its tokens and the hash
//! it was chained from, and a lookup compares both, so a hash collision is a miss,
//! never a wrong hit.
//!
//! [`PrefixCache::lookup`] returns the longest run of cached blocks at the start of a
//! prompt as a [`PrefixHit`], which holds the blocks by reference count ([`Arc`]):
//! while a hit is alive its blocks are neither evicted nor expired.
//! [`PrefixHit::seed`] writes them into a sequence's fresh [`KvCache`], so the
//! forward pass only runs the rest of the prompt; [`PrefixCache::insert`] publishes
//! the full blocks of a sequence's cache after its prefill.
//!
//! # Sharing and copy-on-write
//!
//! Blocks are read-only once published. A sequence never writes into a block: seeding
//! copies the blocks' keys and values into the sequence's own buffers (attention runs
//! over one contiguous buffer per layer), and the sequence's own tail (the partial last
//! block of its prompt, then the generated tokens) is written there after them.
//! Publishing copies the sequence's new full blocks out of its buffers, so later
//! writes to the sequence (decoding, truncation) never reach the cache. Two requests
//! that share a prefix share its blocks; where they part, each publishes its own
//! blocks under its own chained keys.
//!
//! # Eviction
//!
//! The blocks together never take more than [`PrefixCacheConfig::budget_bytes`]. An
//! insert that would pass it first evicts unreferenced blocks, least recently used
//! first; when only referenced blocks are left, the insert stops (the cache keeps what
//! fits rather than growing). Blocks unused for [`PrefixCacheConfig::ttl`] are dropped
//! at the next lookup or insert. Only leaves are evicted (blocks no other cached
//! block was chained from) and a lookup touches a chain from its end to its start, so
//! a parent is always more recent than its children: eviction shortens chains from
//! their ends and never leaves an unreachable block behind.
//!
//! # Pruned caches
//!
//! A pruned cache (one whose [`KvCache::evicted_tokens`] is not zero) no longer holds
//! positions `0..len` contiguously, so its blocks would not be the prefix they claim
//! to be: [`PrefixCache::insert`] publishes nothing from it.
//!
//! # Time
//!
//! Lookups and inserts have an `_at` form taking the current [`Instant`], so expiry is
//! testable without waiting; the plain forms use [`Instant::now`]. The times given
//! should not go backwards (a block counts as fresh from its latest use).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::cache::KvCache;
use crate::error::{Error, Result};

/// Keys the blocks of one model (and one set of prompt inputs that are not tokens,
/// such as images) apart from every other's: blocks are shared only under an equal
/// salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Salt(u64);

impl Salt {
    /// The salt of `bytes` (for example a model's id and weight scheme).
    pub fn new(bytes: &[u8]) -> Self {
        Self::default().with(bytes)
    }

    /// This salt mixed with `bytes` (for example the bytes of an image in the prompt).
    #[must_use]
    pub fn with(self, bytes: &[u8]) -> Self {
        let mut h = DefaultHasher::new();
        self.0.hash(&mut h);
        bytes.hash(&mut h);
        Self(h.finish())
    }
}

/// The limits of a [`PrefixCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheConfig {
    /// Tokens per block; only full blocks are cached. Default 16.
    pub block_tokens: usize,
    /// The most bytes the blocks take together. Default 256 MiB.
    pub budget_bytes: u64,
    /// Unreferenced blocks unused for this long are dropped; `None`: never. Default 10
    /// minutes.
    pub ttl: Option<Duration>,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        Self {
            block_tokens: 16,
            budget_bytes: 256 << 20,
            ttl: Some(Duration::from_secs(600)),
        }
    }
}

/// What a [`PrefixCache`] has done so far and holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Lookups made.
    pub lookups: u64,
    /// Prompt tokens the lookups were asked about.
    pub lookup_tokens: u64,
    /// Prompt tokens the lookups found cached (the prefill they saved).
    pub hit_tokens: u64,
    /// Blocks published.
    pub inserted_blocks: u64,
    /// Blocks evicted to stay within the byte budget.
    pub evicted_blocks: u64,
    /// Blocks dropped for passing the time-to-live.
    pub expired_blocks: u64,
    /// Blocks held now.
    pub blocks: usize,
    /// Bytes held now.
    pub bytes: u64,
}

/// One cached block: its tokens and, per layer, their keys and values
/// (`[1, kv_heads, block_tokens, head_dim]`). Immutable once built.
#[derive(Debug)]
struct Block {
    /// The hash it was chained from (the salt's for a first block).
    prev: u64,
    /// Whether it is the first block of a prompt.
    root: bool,
    tokens: Box<[u32]>,
    layers: Vec<(Tensor, Tensor)>,
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    block: Arc<Block>,
    last_used: Instant,
    tick: u64,
    /// Cached blocks chained from this one.
    children: usize,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    /// Entries by last use (ticks ascending: least recent first).
    lru: BTreeMap<u64, u64>,
    tick: u64,
    stats: PrefixCacheStats,
}

/// The longest cached prefix of a prompt, found by [`PrefixCache::lookup`]. Holding it
/// keeps its blocks from being evicted or expired.
#[derive(Debug, Clone, Default)]
pub struct PrefixHit {
    blocks: Vec<Arc<Block>>,
    block_tokens: usize,
}

impl PrefixHit {
    /// Prompt tokens covered (a multiple of the block size).
    pub fn tokens(&self) -> usize {
        self.blocks.len() * self.block_tokens
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Blocks found.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Writes the hit's keys and values into `cache`, which must be empty, as its
    /// first [`PrefixHit::tokens`] tokens (copies: the blocks stay as they are).
    ///
    /// # Errors
    /// [`Error::NotEmpty`] for a cache that holds tokens; [`Error::PrefixLayout`] when a
    /// block's layers or shape differ from the cache's; [`Error::Full`] when the
    /// prefix does not fit the cache.
    pub fn seed(&self, cache: &mut KvCache) -> Result<()> {
        if !cache.is_empty() || cache.position() != 0 {
            return Err(Error::NotEmpty {
                len: cache.len(),
                position: cache.position(),
            });
        }
        let c = *cache.config();
        let (dtype, width) = c.storage();
        for (b, block) in self.blocks.iter().enumerate() {
            let fits = block.layers.len() == c.layers
                && block.layers.iter().all(|(k, v)| {
                    k.dims() == [1, c.kv_heads, self.block_tokens, width]
                        && v.dims() == k.dims()
                        && k.dtype() == dtype
                });
            if !fits {
                let got = block.layers.first().map_or_else(Vec::new, |(k, _)| {
                    let mut d = k.dims().to_vec();
                    d.insert(0, block.layers.len());
                    d
                });
                return Err(Error::PrefixLayout {
                    block: b,
                    got,
                    want: vec![c.layers, 1, c.kv_heads, self.block_tokens, width],
                });
            }
        }
        cache.reserve(self.tokens())?;
        for layer in 0..c.layers {
            for (b, block) in self.blocks.iter().enumerate() {
                let (k, v) = &block.layers[layer];
                cache.write_stored_at(layer, b * self.block_tokens, k, v)?;
            }
        }
        cache.commit(self.tokens())
    }
}

/// Keys and values of shared prompt prefixes across requests. See the module docs.
///
/// Shared between threads by reference: every method takes `&self`.
#[derive(Debug)]
pub struct PrefixCache {
    config: PrefixCacheConfig,
    inner: Mutex<Inner>,
}

impl PrefixCache {
    /// An empty cache.
    ///
    /// # Errors
    /// [`Error::PrefixBlockTokens`] for a block size of zero.
    pub fn new(config: PrefixCacheConfig) -> Result<Self> {
        if config.block_tokens == 0 {
            return Err(Error::PrefixBlockTokens {
                block_tokens: config.block_tokens,
            });
        }
        Ok(Self {
            config,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The limits.
    pub fn config(&self) -> &PrefixCacheConfig {
        &self.config
    }

    /// The counters and what is held now.
    pub fn stats(&self) -> PrefixCacheStats {
        self.lock().stats
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.lock().stats.bytes
    }

    /// Drops every block no [`PrefixHit`] holds.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let ticks: Vec<u64> = inner.lru.keys().copied().collect();
        for tick in ticks {
            inner.remove_if(tick, |_| true);
        }
    }

    /// The longest cached prefix of `tokens` under `salt`, in whole blocks, now.
    pub fn lookup(&self, salt: Salt, tokens: &[u32]) -> PrefixHit {
        self.lookup_at(salt, tokens, Instant::now())
    }

    /// [`PrefixCache::lookup`] at the time `now`: expired blocks are dropped first, and
    /// the blocks found count as used at `now`.
    pub fn lookup_at(&self, salt: Salt, tokens: &[u32], now: Instant) -> PrefixHit {
        let bt = self.config.block_tokens;
        let mut inner = self.lock();
        inner.expire(now, self.config.ttl);
        let mut hashes = Vec::new();
        let mut blocks = Vec::new();
        for (prev, hash, chunk) in chain(salt, tokens, bt) {
            match inner.entries.get(&hash) {
                Some(e) if e.block.prev == prev && *e.block.tokens == *chunk => {
                    blocks.push(Arc::clone(&e.block));
                    hashes.push(hash);
                }
                _ => break,
            }
        }
        inner.touch(&hashes, now);
        let s = &mut inner.stats;
        s.lookups += 1;
        s.lookup_tokens += tokens.len() as u64;
        s.hit_tokens += (blocks.len() * bt) as u64;
        tracing::trace!(
            tokens = tokens.len(),
            hit = blocks.len() * bt,
            "prefix cache lookup"
        );
        PrefixHit {
            blocks,
            block_tokens: bt,
        }
    }

    /// Publishes the full blocks of `tokens` whose keys and values `cache` holds (its
    /// first `tokens.len()` tokens must be exactly these), under `salt`, now. Returns
    /// the blocks added (blocks cached already are reused, not copied again).
    ///
    /// A pruned cache publishes nothing (see the module docs); neither does a block
    /// that cannot fit the byte budget once every unreferenced block is evicted.
    ///
    /// # Errors
    /// [`Error::PrefixTokens`] when `cache` holds fewer than `tokens.len()` tokens.
    pub fn insert(&self, salt: Salt, tokens: &[u32], cache: &KvCache) -> Result<usize> {
        self.insert_at(salt, tokens, cache, Instant::now())
    }

    /// [`PrefixCache::insert`] at the time `now`.
    ///
    /// # Errors
    /// As [`PrefixCache::insert`].
    pub fn insert_at(
        &self,
        salt: Salt,
        tokens: &[u32],
        cache: &KvCache,
        now: Instant,
    ) -> Result<usize> {
        if tokens.len() > cache.len() {
            return Err(Error::PrefixTokens {
                tokens: tokens.len(),
                held: cache.len(),
            });
        }
        if cache.evicted_tokens() > 0 || cache.len() != cache.position() {
            tracing::debug!(
                evicted = cache.evicted_tokens(),
                "a pruned KV cache publishes no prefix blocks"
            );
            return Ok(0);
        }
        let bt = self.config.block_tokens;
        let block_bytes = bt as u64 * cache.config().bytes_per_token();
        let held: Vec<Option<(Tensor, Tensor)>> = (0..cache.config().layers)
            .map(|l| cache.held(l))
            .collect::<Result<_>>()?;
        let mut inner = self.lock();
        inner.expire(now, self.config.ttl);
        // The chain so far, held here so that making room never evicts it.
        let mut kept: Vec<Arc<Block>> = Vec::new();
        let mut hashes = Vec::new();
        let mut added = 0;
        for (i, (prev, hash, chunk)) in chain(salt, tokens, bt).enumerate() {
            if let Some(e) = inner.entries.get(&hash) {
                if e.block.prev == prev && *e.block.tokens == *chunk {
                    kept.push(Arc::clone(&e.block));
                    hashes.push(hash);
                    continue;
                }
                // A different block under the same hash: keep the one cached.
                break;
            }
            if !inner.make_room(block_bytes, self.config.budget_bytes) {
                break;
            }
            let mut layers = Vec::with_capacity(held.len());
            for h in &held {
                let Some((k, v)) = h else {
                    return Ok(added);
                };
                // A compact copy of the block's own slots (`copy` would clone the whole
                // buffer, and `contiguous` may share it).
                layers.push((
                    k.narrow(2, i * bt, bt)?.force_contiguous()?,
                    v.narrow(2, i * bt, bt)?.force_contiguous()?,
                ));
            }
            let block = Arc::new(Block {
                prev,
                root: i == 0,
                tokens: chunk.into(),
                layers,
                bytes: block_bytes,
            });
            if i > 0
                && let Some(parent) = inner.entries.get_mut(&prev)
            {
                parent.children += 1;
            }
            let tick = inner.next_tick();
            inner.lru.insert(tick, hash);
            inner.entries.insert(
                hash,
                Entry {
                    block: Arc::clone(&block),
                    last_used: now,
                    tick,
                    children: 0,
                },
            );
            inner.stats.bytes += block_bytes;
            inner.stats.blocks += 1;
            inner.stats.inserted_blocks += 1;
            kept.push(block);
            hashes.push(hash);
            added += 1;
        }
        inner.touch(&hashes, now);
        Ok(added)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent between statements: a panic elsewhere while
        // holding the lock leaves nothing half-done worth refusing.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks a chain (first block first) as used at `now`, from its end to its start,
    /// so that every parent is more recent than its children.
    fn touch(&mut self, hashes: &[u64], now: Instant) {
        for hash in hashes.iter().rev() {
            let tick = self.next_tick();
            if let Some(e) = self.entries.get_mut(hash) {
                self.lru.remove(&e.tick);
                e.tick = tick;
                e.last_used = now;
                self.lru.insert(tick, *hash);
            }
        }
    }

    /// Removes the entry of `tick` if it is an unreferenced leaf and `cond` holds for
    /// it; returns whether it was removed.
    fn remove_if(&mut self, tick: u64, cond: impl Fn(&Entry) -> bool) -> bool {
        let Some(&hash) = self.lru.get(&tick) else {
            return false;
        };
        let removable = self
            .entries
            .get(&hash)
            .is_some_and(|e| e.children == 0 && Arc::strong_count(&e.block) == 1 && cond(e));
        if !removable {
            return false;
        }
        self.lru.remove(&tick);
        if let Some(e) = self.entries.remove(&hash) {
            if !e.block.root
                && let Some(parent) = self.entries.get_mut(&e.block.prev)
            {
                parent.children = parent.children.saturating_sub(1);
            }
            self.stats.bytes -= e.block.bytes;
            self.stats.blocks -= 1;
        }
        true
    }

    /// Drops the unreferenced blocks unused for `ttl` by `now`.
    fn expire(&mut self, now: Instant, ttl: Option<Duration>) {
        let Some(ttl) = ttl else {
            return;
        };
        // Least recent first (children come before their parents), up to the first
        // block still fresh: every later one was used later.
        let ticks: Vec<u64> = self
            .lru
            .iter()
            .take_while(|&(_, hash)| {
                self.entries
                    .get(hash)
                    .is_some_and(|e| now.saturating_duration_since(e.last_used) >= ttl)
            })
            .map(|(&tick, _)| tick)
            .collect();
        for tick in ticks {
            if self.remove_if(tick, |e| now.saturating_duration_since(e.last_used) >= ttl) {
                self.stats.expired_blocks += 1;
            }
        }
    }

    /// Evicts unreferenced blocks, least recent first, until `bytes` more fit the
    /// budget; returns whether they do.
    fn make_room(&mut self, bytes: u64, budget: u64) -> bool {
        if self.stats.bytes + bytes <= budget {
            return true;
        }
        if bytes > budget {
            return false;
        }
        let ticks: Vec<u64> = self.lru.keys().copied().collect();
        for tick in ticks {
            if self.remove_if(tick, |_| true) {
                self.stats.evicted_blocks += 1;
                if self.stats.bytes + bytes <= budget {
                    return true;
                }
            }
        }
        false
    }
}

/// The full blocks of `tokens`: for each, the hash it chains from, its own hash and
/// its tokens.
fn chain(salt: Salt, tokens: &[u32], bt: usize) -> impl Iterator<Item = (u64, u64, &[u32])> {
    tokens.chunks_exact(bt).scan(salt.0, |prev, chunk| {
        let mut h = DefaultHasher::new();
        prev.hash(&mut h);
        chunk.hash(&mut h);
        let hash = h.finish();
        let item = (*prev, hash, chunk);
        *prev = hash;
        Some(item)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KvCacheConfig;
    use crate::policy::PrunePolicy;
    use candle_core::{Device, IndexOp};

    const BT: usize = 4;

    fn kv_config() -> KvCacheConfig {
        KvCacheConfig {
            layers: 2,
            kv_heads: 2,
            head_dim: 3,
            max_tokens: 256,
            block_tokens: 8,
            format: crate::KvFormat::F32,
            budget_tokens: None,
            policy: PrunePolicy::None,
        }
    }

    /// Bytes of one block of `BT` tokens in `kv_config`.
    fn block_bytes() -> u64 {
        BT as u64 * kv_config().bytes_per_token()
    }

    fn prefix_cache(blocks: u64, ttl: Option<Duration>) -> PrefixCache {
        PrefixCache::new(PrefixCacheConfig {
            block_tokens: BT,
            budget_bytes: blocks * block_bytes(),
            ttl,
        })
        .unwrap()
    }

    /// A cache whose key at (layer, head, position, d) is a function of the token id
    /// there, its position and `seed`: what a forward pass would compute, more or less.
    fn filled(tokens: &[u32], seed: f32) -> KvCache {
        let mut cache = KvCache::new(kv_config(), &Device::Cpu);
        for layer in 0..2 {
            let data: Vec<f32> = (0..2)
                .flat_map(|h| {
                    tokens.iter().enumerate().flat_map(move |(p, &t)| {
                        (0..3).map(move |d| {
                            seed + t as f32 * 1000.0
                                + p as f32
                                + (layer * 10 + h) as f32 * 0.1
                                + d as f32 * 0.01
                        })
                    })
                })
                .collect();
            let k = Tensor::from_vec(data, (1, 2, tokens.len(), 3), &Device::Cpu).unwrap();
            let v = (&k * 2.0).unwrap();
            cache.append(layer, &k, &v).unwrap();
        }
        cache.commit(tokens.len()).unwrap();
        cache
    }

    fn keys(cache: &KvCache, layer: usize) -> Vec<f32> {
        let (k, _) = cache.held(layer).unwrap().unwrap();
        k.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn values(cache: &KvCache, layer: usize) -> Vec<f32> {
        let (_, v) = cache.held(layer).unwrap().unwrap();
        v.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn ids(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    fn salt() -> Salt {
        Salt::new(b"model-a")
    }

    #[test]
    fn q8_0_blocks_seed_a_q8_0_cache_byte_for_byte() {
        let config = KvCacheConfig {
            head_dim: 32,
            format: crate::KvFormat::Q8_0,
            ..kv_config()
        };
        let fill = |tokens: &[u32]| {
            let mut cache = KvCache::new(config, &Device::Cpu);
            for layer in 0..2 {
                let n = tokens.len();
                // A function of (layer, head, position, element), as a forward pass.
                let data: Vec<f32> = (0..2 * n * 32)
                    .map(|i| {
                        let (h, p, d) = (i / (n * 32), i / 32 % n, i % 32);
                        ((layer * 7 + h * 5 + p * 3 + d) as f32 * 0.731).sin() * 3.0
                    })
                    .collect();
                let k = Tensor::from_vec(data, (1, 2, tokens.len(), 32), &Device::Cpu).unwrap();
                cache.append(layer, &k, &(&k * 0.5).unwrap()).unwrap();
            }
            cache.commit(tokens.len()).unwrap();
            cache
        };
        let bytes = |cache: &KvCache, layer: usize| -> Vec<u8> {
            let (k, v) = cache.held(layer).unwrap().unwrap();
            let mut b: Vec<u8> = k.flatten_all().unwrap().to_vec1().unwrap();
            b.extend(v.flatten_all().unwrap().to_vec1::<u8>().unwrap());
            b
        };
        let pc = PrefixCache::new(PrefixCacheConfig {
            block_tokens: BT,
            budget_bytes: 100 * BT as u64 * config.bytes_per_token(),
            ttl: None,
        })
        .unwrap();
        let prompt = ids(10, 3);
        let a = fill(&prompt);
        assert_eq!(pc.insert(salt(), &prompt, &a).unwrap(), 2);
        // The blocks are counted in the format's bytes: 34 per row of 32, not 128.
        assert_eq!(pc.stats().bytes, 2 * BT as u64 * 2 * 2 * 2 * 34);
        let hit = pc.lookup(salt(), &prompt);
        let mut b = KvCache::new(config, &Device::Cpu);
        hit.seed(&mut b).unwrap();
        assert_eq!(b.len(), 8);
        let want = fill(&prompt[..8]);
        for layer in 0..2 {
            assert_eq!(bytes(&b, layer), bytes(&want, layer));
        }
        // An f32 cache cannot take Q8_0 blocks: the layout error says so.
        let mut f = KvCache::new(
            KvCacheConfig {
                format: crate::KvFormat::F32,
                ..config
            },
            &Device::Cpu,
        );
        assert!(matches!(
            pc.lookup(salt(), &prompt).seed(&mut f),
            Err(Error::PrefixLayout { .. })
        ));
    }

    #[test]
    fn a_hit_seeds_exactly_the_keys_and_values_of_the_prefix() {
        let pc = prefix_cache(100, None);
        let prompt = ids(18, 7);
        let a = filled(&prompt, 0.0);
        assert_eq!(
            pc.insert(salt(), &prompt, &a).unwrap(),
            4,
            "18 tokens: 4 full blocks"
        );
        assert_eq!(pc.stats().bytes, 4 * block_bytes());

        // The same first 16 tokens, then a different tail.
        let mut other = prompt[..16].to_vec();
        other.extend([900, 901, 902]);
        let hit = pc.lookup(salt(), &other);
        assert_eq!((hit.tokens(), hit.blocks()), (16, 4));
        let mut b = KvCache::new(kv_config(), &Device::Cpu);
        hit.seed(&mut b).unwrap();
        assert_eq!((b.len(), b.position()), (16, 16));
        let want = filled(&prompt[..16], 0.0);
        for layer in 0..2 {
            assert_eq!(keys(&b, layer), keys(&want, layer));
            assert_eq!(values(&b, layer), values(&want, layer));
        }
        let s = pc.stats();
        assert_eq!((s.lookups, s.lookup_tokens, s.hit_tokens), (1, 19, 16));
    }

    #[test]
    fn keys_chain_the_salt_and_every_earlier_block() {
        let pc = prefix_cache(100, None);
        let prompt = ids(12, 0);
        pc.insert(salt(), &prompt, &filled(&prompt, 0.0)).unwrap();
        assert_eq!(pc.lookup(salt(), &prompt).tokens(), 12);
        // Another model (or other images) never hits.
        assert!(pc.lookup(Salt::new(b"model-b"), &prompt).is_empty());
        assert!(pc.lookup(salt().with(b"image"), &prompt).is_empty());
        // A change in the first block: the later blocks, equal as they are, miss too.
        let mut changed = prompt.clone();
        changed[1] = 99;
        assert!(pc.lookup(salt(), &changed).is_empty());
        // A change in the second block: only the first block hits.
        let mut changed = prompt.clone();
        changed[5] = 99;
        assert_eq!(pc.lookup(salt(), &changed).tokens(), 4);
        // A partial block is never a hit.
        assert_eq!(pc.lookup(salt(), &prompt[..7]).tokens(), 4);
        assert!(pc.lookup(salt(), &prompt[..3]).is_empty());
        // Equal salts from equal bytes.
        assert_eq!(Salt::new(b"x").with(b"y"), Salt::new(b"x").with(b"y"));
        assert_ne!(Salt::new(b"x").with(b"y"), Salt::new(b"xy"));
    }

    #[test]
    fn shared_blocks_are_reused_and_never_written() {
        let pc = prefix_cache(100, None);
        let prompt = ids(8, 0);
        let mut a = filled(&prompt, 0.0);
        pc.insert(salt(), &prompt, &a).unwrap();
        // The sequence goes on writing its own buffers: truncation and new values at
        // the cached positions do not reach the cache.
        a.truncate(2);
        let junk = Tensor::full(-5f32, (1, 2, 6, 3), &Device::Cpu).unwrap();
        for layer in 0..2 {
            a.append(layer, &junk, &junk).unwrap();
        }
        a.commit(6).unwrap();
        // A request extending the shared prefix reuses its blocks and adds its own.
        let mut longer = prompt.clone();
        longer.extend(ids(4, 500));
        let hit = pc.lookup(salt(), &longer);
        assert_eq!(hit.tokens(), 8);
        let mut b = KvCache::new(kv_config(), &Device::Cpu);
        hit.seed(&mut b).unwrap();
        let want = filled(&prompt, 0.0);
        assert_eq!(keys(&b, 1), keys(&want, 1));
        // b writes its tail after the shared blocks, in its own buffers.
        let tail = filled(&longer, 0.0);
        let (k, v) = tail.held(0).unwrap().unwrap();
        let (k, v) = (
            k.i((.., .., 8.., ..)).unwrap(),
            v.i((.., .., 8.., ..)).unwrap(),
        );
        for layer in 0..2 {
            b.append(layer, &k, &v).unwrap();
        }
        b.commit(4).unwrap();
        assert_eq!(
            pc.insert(salt(), &longer, &b).unwrap(),
            1,
            "only the new block"
        );
        assert_eq!(pc.stats().blocks, 3);
        // Each block holds its own compact storage, not a view of a sequence's buffer.
        for e in pc.lock().entries.values() {
            for (k, v) in &e.block.layers {
                for t in [k, v] {
                    assert!(t.is_contiguous() && t.layout().start_offset() == 0);
                    assert_eq!(t.elem_count(), 2 * BT * 3);
                }
            }
        }
        // The first blocks are still the original ones.
        let mut c = KvCache::new(kv_config(), &Device::Cpu);
        pc.lookup(salt(), &longer).seed(&mut c).unwrap();
        assert_eq!(c.len(), 12);
        let (ck, _) = c.held(0).unwrap().unwrap();
        let first: Vec<f32> = ck
            .narrow(2, 0, 8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(first, keys(&want, 0));
    }

    #[test]
    fn referenced_blocks_are_not_evicted() {
        // Room for three blocks.
        let pc = prefix_cache(3, None);
        let x = ids(8, 0);
        pc.insert(salt(), &x, &filled(&x, 0.0)).unwrap();
        let hit = pc.lookup(salt(), &x);
        assert_eq!(hit.blocks(), 2);
        // A 2-block prompt: one fits, the other would need a held block's room.
        let y = ids(8, 100);
        assert_eq!(pc.insert(salt(), &y, &filled(&y, 0.0)).unwrap(), 1);
        assert_eq!(pc.stats().bytes, 3 * block_bytes());
        assert_eq!(pc.lookup(salt(), &x).tokens(), 8, "the held chain survived");
        drop(hit);
        // Unheld now: y's second block evicts x's chain end.
        assert_eq!(pc.insert(salt(), &y, &filled(&y, 0.0)).unwrap(), 1);
        assert_eq!(pc.lookup(salt(), &x).tokens(), 4);
        assert_eq!(pc.lookup(salt(), &y).tokens(), 8);
        assert_eq!(pc.stats().evicted_blocks, 1);
    }

    #[test]
    fn the_least_recently_used_chain_end_goes_first() {
        let pc = prefix_cache(4, None);
        let t0 = Instant::now();
        let a = ids(8, 0);
        let b = ids(4, 100);
        let c = ids(4, 200);
        pc.insert_at(salt(), &a, &filled(&a, 0.0), t0).unwrap();
        pc.insert_at(salt(), &b, &filled(&b, 0.0), t0).unwrap();
        pc.insert_at(salt(), &c, &filled(&c, 0.0), t0).unwrap();
        // Use a and c: b is now the least recently used.
        pc.lookup_at(salt(), &a, t0);
        pc.lookup_at(salt(), &c, t0);
        let d = ids(4, 300);
        assert_eq!(pc.insert_at(salt(), &d, &filled(&d, 0.0), t0).unwrap(), 1);
        assert!(pc.lookup_at(salt(), &b, t0).is_empty());
        assert_eq!(pc.lookup_at(salt(), &a, t0).tokens(), 8);
        assert_eq!(pc.lookup_at(salt(), &d, t0).tokens(), 4);
        // Now c is the oldest; then the end of a's chain, before its start.
        let e = ids(8, 400);
        assert_eq!(pc.insert_at(salt(), &e, &filled(&e, 0.0), t0).unwrap(), 2);
        assert!(pc.lookup_at(salt(), &c, t0).is_empty());
        assert_eq!(pc.lookup_at(salt(), &a, t0).tokens(), 4);
        assert_eq!(pc.lookup_at(salt(), &d, t0).tokens(), 4);
        assert_eq!(pc.stats().evicted_blocks, 3);
    }

    #[test]
    fn unused_blocks_expire_after_the_ttl_unless_held() {
        let ttl = Duration::from_secs(60);
        let pc = prefix_cache(100, Some(ttl));
        let t0 = Instant::now();
        let a = ids(8, 0);
        let b = ids(4, 100);
        pc.insert_at(salt(), &a, &filled(&a, 0.0), t0).unwrap();
        pc.insert_at(salt(), &b, &filled(&b, 0.0), t0).unwrap();
        let t1 = t0 + Duration::from_secs(50);
        assert_eq!(pc.lookup_at(salt(), &a, t1).tokens(), 8, "used again at t1");
        let held_b = pc.lookup_at(salt(), &b, t1);
        // At t0 + 100 s, 50 s after their last use, both are still there.
        let t2 = t0 + Duration::from_secs(100);
        assert_eq!(pc.lookup_at(salt(), &a, t2).tokens(), 8);
        // At t2 + 61 s: a expires; b is held and stays.
        let t3 = t2 + Duration::from_secs(61);
        assert!(pc.lookup_at(salt(), &a, t3).is_empty());
        assert_eq!(pc.stats().expired_blocks, 2);
        assert_eq!(pc.stats().blocks, 1);
        drop(held_b);
        assert!(pc.lookup_at(salt(), &b, t3 + ttl).is_empty());
        let s = pc.stats();
        assert_eq!((s.blocks, s.bytes, s.expired_blocks), (0, 0, 3));
    }

    #[test]
    fn the_cache_never_passes_its_budget() {
        let pc = prefix_cache(5, None);
        let mut held = Vec::new();
        for round in 0..60u32 {
            // Prompts of 1-5 blocks, some sharing a start, some hits kept alive.
            let n = 4 * (1 + (round as usize * 7) % 5) + (round as usize % 3);
            let base = if round % 4 == 0 { 0 } else { round * 1000 };
            let prompt = ids(n, base);
            pc.insert(salt(), &prompt, &filled(&prompt, 0.0)).unwrap();
            assert!(
                pc.bytes() <= 5 * block_bytes(),
                "round {round}: {}",
                pc.bytes()
            );
            let hit = pc.lookup(salt(), &prompt);
            if round % 5 == 0 {
                held.push(hit);
            }
            if held.len() > 2 {
                held.remove(0);
            }
            let s = pc.stats();
            assert_eq!(s.bytes, s.blocks as u64 * block_bytes());
        }
        assert!(pc.stats().evicted_blocks > 0);
        // A block larger than the whole budget is never stored.
        let tiny = PrefixCache::new(PrefixCacheConfig {
            block_tokens: BT,
            budget_bytes: block_bytes() - 1,
            ttl: None,
        })
        .unwrap();
        let p = ids(8, 0);
        assert_eq!(tiny.insert(salt(), &p, &filled(&p, 0.0)).unwrap(), 0);
        assert_eq!(tiny.bytes(), 0);
        drop(held);
        pc.clear();
        assert_eq!((pc.stats().blocks, pc.bytes()), (0, 0));
    }

    #[test]
    fn a_pruned_cache_publishes_nothing() {
        let pc = prefix_cache(100, None);
        let mut c = kv_config();
        c.budget_tokens = Some(8);
        c.policy = PrunePolicy::SlidingWindow { window: 6 };
        let mut cache = KvCache::new(c, &Device::Cpu);
        let prompt = ids(12, 0);
        for (p, _) in prompt.iter().enumerate() {
            cache.make_room(1).unwrap();
            let k = Tensor::full(p as f32, (1, 2, 1, 3), &Device::Cpu).unwrap();
            for layer in 0..2 {
                cache.append(layer, &k, &k).unwrap();
            }
            cache.commit(1).unwrap();
        }
        assert!(cache.evicted_tokens() > 0);
        let held = &prompt[..cache.len()];
        assert_eq!(pc.insert(salt(), held, &cache).unwrap(), 0);
        assert_eq!(pc.stats().blocks, 0);
    }

    #[test]
    fn misuse_is_an_error() {
        assert!(matches!(
            PrefixCache::new(PrefixCacheConfig {
                block_tokens: 0,
                ..PrefixCacheConfig::default()
            }),
            Err(Error::PrefixBlockTokens { .. })
        ));
        let pc = prefix_cache(100, None);
        let prompt = ids(8, 0);
        let a = filled(&prompt[..6], 0.0);
        let err = pc.insert(salt(), &prompt, &a).unwrap_err();
        assert!(err.to_string().contains("8 tokens"), "{err}");
        pc.insert(salt(), &prompt, &filled(&prompt, 0.0)).unwrap();
        let hit = pc.lookup(salt(), &prompt);
        // Seeding a cache that holds tokens already.
        let mut full = filled(&prompt[..2], 0.0);
        assert!(matches!(hit.seed(&mut full), Err(Error::NotEmpty { .. })));
        // Seeding a cache of another shape.
        let mut c = kv_config();
        c.head_dim = 5;
        let mut other = KvCache::new(c, &Device::Cpu);
        let err = hit.seed(&mut other).unwrap_err();
        assert!(matches!(err, Error::PrefixLayout { block: 0, .. }), "{err}");
        assert!(other.is_empty());
    }
}
