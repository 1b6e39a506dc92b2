//! The lazy model cache: load on first use, share afterwards, evict idle models.
//!
//! [`ModelCache::acquire`] loads a model the first time its key is asked for and hands
//! out a shared [`Arc`] afterwards. Concurrent acquires of the same key load it once:
//! the first caller loads, the others wait for its result. Before a load, idle models
//! (held by nobody but the cache) are evicted least-recently-used until the new model's
//! estimated bytes fit the cache's byte budget; models in use are never evicted. Idle
//! models older than the keep-alive time are dropped on the next cache operation.
//!
//! The cache is generic over the model type so that its policy can be tested without
//! real weights; the engine uses it with its loaded models.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// What the cache needs to know of a model: how many bytes it keeps resident.
pub trait CacheWeight {
    /// Bytes this model keeps resident (weights plus any fixed tables).
    fn resident_bytes(&self) -> u64;
}

/// The result of [`ModelCache::acquire`]: the shared model and what the acquire cost.
#[derive(Debug)]
pub struct Acquired<M> {
    /// The shared model.
    pub model: Arc<M>,
    /// Whether the model was already loaded (or being loaded by another caller).
    pub hit: bool,
    /// Wall time of this acquire, in milliseconds: the load time on a miss, the
    /// re-acquire overhead on a hit.
    pub acquire_ms: f64,
    /// How long the model took to load when it was loaded, in milliseconds.
    pub load_ms: f64,
}

/// Counters of a [`ModelCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    /// Acquires served by a model already loaded or being loaded.
    pub hits: u64,
    /// Acquires that loaded a model.
    pub misses: u64,
    /// Models evicted to make room or because their keep-alive ran out.
    pub evictions: u64,
    /// Bytes held by the models in the cache now, plus the estimates of loads in
    /// flight.
    pub resident_bytes: u64,
    /// Models in the cache now.
    pub models: usize,
}

impl CacheStats {
    /// Hits over all acquires, in `0..=1`; `None` before the first acquire.
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

/// One model held by the cache, as [`ModelCache::loaded`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedEntry {
    /// The model's key.
    pub key: String,
    /// Resident bytes.
    pub bytes: u64,
    /// Whether somebody besides the cache holds the model.
    pub in_use: bool,
    /// Time since the model was last acquired.
    pub idle_for: Duration,
    /// How long the model took to load, in milliseconds.
    pub load_ms: f64,
}

/// A lazy, shared, byte-budgeted cache of loaded models.
#[derive(Debug)]
pub struct ModelCache<M> {
    state: Mutex<State<M>>,
    budget_bytes: u64,
    keep_alive: Option<Duration>,
}

#[derive(Debug)]
struct State<M> {
    slots: HashMap<String, Slot<M>>,
    stats: CacheStats,
}

#[derive(Debug)]
enum Slot<M> {
    /// Being loaded by one caller; the estimate holds its place in the budget.
    Loading {
        pending: Arc<PendingLoad<M>>,
        estimated_bytes: u64,
    },
    Ready(Entry<M>),
}

#[derive(Debug)]
struct Entry<M> {
    model: Arc<M>,
    bytes: u64,
    last_used: Instant,
    load_ms: f64,
}

type LoadOutcome<M> = std::result::Result<(Arc<M>, f64), String>;

#[derive(Debug)]
struct PendingLoad<M> {
    outcome: Mutex<Option<LoadOutcome<M>>>,
    done: Condvar,
}

impl<M> PendingLoad<M> {
    fn finish(&self, outcome: LoadOutcome<M>) {
        *lock(&self.outcome) = Some(outcome);
        self.done.notify_all();
    }

    fn wait(&self) -> LoadOutcome<M> {
        let mut guard = lock(&self.outcome);
        loop {
            if let Some(outcome) = guard.as_ref() {
                return match outcome {
                    Ok((model, ms)) => Ok((Arc::clone(model), *ms)),
                    Err(reason) => Err(reason.clone()),
                };
            }
            guard = self.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Locks a mutex, taking the data back from a poisoned one: every critical section in
/// this module leaves the state consistent before anything that can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks a pending load failed if the loader unwinds, so waiters never hang.
struct LoadGuard<'a, M> {
    cache: &'a ModelCache<M>,
    key: &'a str,
    pending: &'a Arc<PendingLoad<M>>,
    armed: bool,
}

impl<M> Drop for LoadGuard<'_, M> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = lock(&self.cache.state);
            state.slots.remove(self.key);
            drop(state);
            self.pending
                .finish(Err("the loading thread panicked".to_owned()));
        }
    }
}

impl<M: CacheWeight> ModelCache<M> {
    /// A cache that keeps at most `budget_bytes` of models resident, dropping idle
    /// models after `keep_alive` (never, when `None`).
    pub fn new(budget_bytes: u64, keep_alive: Option<Duration>) -> Self {
        Self {
            state: Mutex::new(State {
                slots: HashMap::new(),
                stats: CacheStats::default(),
            }),
            budget_bytes,
            keep_alive,
        }
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Returns the model under `key`, loading it with `load` on first use.
    ///
    /// `estimated_bytes` is what the model will keep resident (the size of its weight
    /// files is a good estimate); idle models are evicted least-recently-used until it
    /// fits the budget. A caller that finds the model being loaded by another caller
    /// waits for that load instead of loading it again.
    ///
    /// # Errors
    ///
    /// [`Error::ModelTooLarge`] when the model does not fit even with every idle model
    /// evicted, the loader's own error, or [`Error::LoadFailed`] when another caller's
    /// load of the same key failed while this caller waited.
    pub fn acquire<F>(&self, key: &str, estimated_bytes: u64, load: F) -> Result<Acquired<M>>
    where
        F: FnOnce() -> Result<M>,
    {
        let start = Instant::now();
        let mut state = lock(&self.state);
        self.expire(&mut state, start);
        let pending = match state.slots.get_mut(key) {
            Some(Slot::Ready(entry)) => {
                entry.last_used = Instant::now();
                let model = Arc::clone(&entry.model);
                let load_ms = entry.load_ms;
                state.stats.hits += 1;
                drop(state);
                return Ok(Acquired {
                    model,
                    hit: true,
                    acquire_ms: ms_since(start),
                    load_ms,
                });
            }
            Some(Slot::Loading { pending, .. }) => Some(Arc::clone(pending)),
            None => None,
        };
        if let Some(pending) = pending {
            state.stats.hits += 1;
            drop(state);
            return match pending.wait() {
                Ok((model, load_ms)) => Ok(Acquired {
                    model,
                    hit: true,
                    acquire_ms: ms_since(start),
                    load_ms,
                }),
                Err(reason) => Err(Error::LoadFailed {
                    model: key.to_owned(),
                    reason,
                }),
            };
        }

        self.make_room(&mut state, key, estimated_bytes)?;
        let pending = Arc::new(PendingLoad {
            outcome: Mutex::new(None),
            done: Condvar::new(),
        });
        state.slots.insert(
            key.to_owned(),
            Slot::Loading {
                pending: Arc::clone(&pending),
                estimated_bytes,
            },
        );
        state.stats.misses += 1;
        drop(state);

        let mut guard = LoadGuard {
            cache: self,
            key,
            pending: &pending,
            armed: true,
        };
        let loaded = load();
        guard.armed = false;
        let load_ms = ms_since(start);

        let mut state = lock(&self.state);
        match loaded {
            Ok(model) => {
                let model = Arc::new(model);
                let bytes = model.resident_bytes();
                state.slots.insert(
                    key.to_owned(),
                    Slot::Ready(Entry {
                        model: Arc::clone(&model),
                        bytes,
                        last_used: Instant::now(),
                        load_ms,
                    }),
                );
                drop(state);
                pending.finish(Ok((Arc::clone(&model), load_ms)));
                Ok(Acquired {
                    model,
                    hit: false,
                    acquire_ms: load_ms,
                    load_ms,
                })
            }
            Err(err) => {
                state.slots.remove(key);
                drop(state);
                pending.finish(Err(err.to_string()));
                Err(err)
            }
        }
    }

    /// Drops the model under `key` from the cache; callers holding it keep their
    /// handle. Returns whether a loaded model was removed.
    pub fn unload(&self, key: &str) -> bool {
        let mut state = lock(&self.state);
        if matches!(state.slots.get(key), Some(Slot::Ready(_))) {
            state.slots.remove(key);
            true
        } else {
            false
        }
    }

    /// Drops every idle model whose keep-alive has run out; returns how many.
    pub fn evict_expired(&self) -> usize {
        let mut state = lock(&self.state);
        self.expire(&mut state, Instant::now())
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        let state = lock(&self.state);
        let mut stats = state.stats;
        stats.resident_bytes = resident(&state);
        stats.models = state
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Ready(_)))
            .count();
        stats
    }

    /// The models loaded now, most recently used first.
    pub fn loaded(&self) -> Vec<LoadedEntry> {
        let state = lock(&self.state);
        let now = Instant::now();
        let mut out: Vec<LoadedEntry> = state
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Ready(e) => Some(LoadedEntry {
                    key: key.clone(),
                    bytes: e.bytes,
                    in_use: Arc::strong_count(&e.model) > 1,
                    idle_for: now.saturating_duration_since(e.last_used),
                    load_ms: e.load_ms,
                }),
                Slot::Loading { .. } => None,
            })
            .collect();
        out.sort_by_key(|e| e.idle_for);
        out
    }

    fn expire(&self, state: &mut State<M>, now: Instant) -> usize {
        let Some(keep_alive) = self.keep_alive else {
            return 0;
        };
        let expired: Vec<String> = state
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Ready(e)
                    if Arc::strong_count(&e.model) == 1
                        && now.saturating_duration_since(e.last_used) >= keep_alive =>
                {
                    Some(key.clone())
                }
                _ => None,
            })
            .collect();
        for key in &expired {
            state.slots.remove(key);
            tracing::debug!(model = %key, "model cache: keep-alive expired");
        }
        state.stats.evictions += expired.len() as u64;
        expired.len()
    }

    fn make_room(&self, state: &mut State<M>, key: &str, needed: u64) -> Result<()> {
        loop {
            let used = resident(state);
            if used.saturating_add(needed) <= self.budget_bytes {
                return Ok(());
            }
            let victim = state
                .slots
                .iter()
                .filter_map(|(k, slot)| match slot {
                    Slot::Ready(e) if Arc::strong_count(&e.model) == 1 => {
                        Some((e.last_used, k.clone()))
                    }
                    _ => None,
                })
                .min();
            match victim {
                Some((_, k)) => {
                    state.slots.remove(&k);
                    state.stats.evictions += 1;
                    tracing::debug!(model = %k, "model cache: evicted least recently used");
                }
                None => {
                    return Err(Error::ModelTooLarge {
                        model: key.to_owned(),
                        needed_bytes: needed,
                        budget_bytes: self.budget_bytes,
                        in_use_bytes: used,
                    });
                }
            }
        }
    }
}

/// Bytes held by loaded models plus the estimates of loads in flight.
fn resident<M>(state: &State<M>) -> u64 {
    state
        .slots
        .values()
        .map(|s| match s {
            Slot::Ready(e) => e.bytes,
            Slot::Loading {
                estimated_bytes, ..
            } => *estimated_bytes,
        })
        .sum()
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct Fake(u64);
    impl CacheWeight for Fake {
        fn resident_bytes(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn loads_once_then_hits() {
        let cache = ModelCache::new(100, None);
        let loads = AtomicUsize::new(0);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(Fake(10))
        };
        let a = cache.acquire("m", 10, load).unwrap();
        assert!(!a.hit);
        let b = cache
            .acquire("m", 10, || -> Result<Fake> { panic!("must not reload") })
            .unwrap();
        assert!(b.hit);
        assert!(Arc::ptr_eq(&a.model, &b.model));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (1, 1));
        assert_eq!(stats.hit_rate(), Some(0.5));
        assert_eq!(stats.resident_bytes, 10);
    }

    #[test]
    fn concurrent_acquires_load_once() {
        let cache = Arc::new(ModelCache::new(100, None));
        let loads = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let loads = Arc::clone(&loads);
                std::thread::spawn(move || {
                    cache
                        .acquire("m", 10, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                            Ok(Fake(10))
                        })
                        .unwrap()
                        .model
                })
            })
            .collect();
        let models: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(models.iter().all(|m| Arc::ptr_eq(m, &models[0])));
    }

    #[test]
    fn evicts_idle_lru_but_never_models_in_use() {
        let cache = ModelCache::new(30, None);
        let a = cache.acquire("a", 10, || Ok(Fake(10))).unwrap();
        drop(cache.acquire("b", 10, || Ok(Fake(10))).unwrap());
        drop(cache.acquire("c", 10, || Ok(Fake(10))).unwrap());
        // Touch b so c is the least recently used idle model.
        drop(cache.acquire("b", 10, || Ok(Fake(10))).unwrap());
        drop(cache.acquire("d", 10, || Ok(Fake(10))).unwrap());
        let keys: Vec<String> = cache.loaded().into_iter().map(|e| e.key).collect();
        assert!(keys.contains(&"a".to_owned()), "a is in use: {keys:?}");
        assert!(keys.contains(&"b".to_owned()));
        assert!(keys.contains(&"d".to_owned()));
        assert!(!keys.contains(&"c".to_owned()), "c was LRU: {keys:?}");
        assert_eq!(cache.stats().evictions, 1);
        drop(a);
    }

    #[test]
    fn too_large_when_everything_is_in_use() {
        let cache = ModelCache::new(15, None);
        let _a = cache.acquire("a", 10, || Ok(Fake(10))).unwrap();
        let err = cache.acquire("b", 10, || Ok(Fake(10))).unwrap_err();
        match err {
            Error::ModelTooLarge {
                needed_bytes,
                budget_bytes,
                in_use_bytes,
                ..
            } => assert_eq!((needed_bytes, budget_bytes, in_use_bytes), (10, 15, 10)),
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn keep_alive_expires_idle_models() {
        let cache = ModelCache::new(100, Some(Duration::from_millis(20)));
        let held = cache.acquire("held", 1, || Ok(Fake(1))).unwrap();
        drop(cache.acquire("idle", 1, || Ok(Fake(1))).unwrap());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.evict_expired(), 1);
        let keys: Vec<String> = cache.loaded().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, vec!["held".to_owned()]);
        drop(held);
    }

    #[test]
    fn failed_load_is_reported_and_retried() {
        let cache: ModelCache<Fake> = ModelCache::new(100, None);
        let err = cache.acquire("m", 1, || Err(Error::Cancelled)).unwrap_err();
        assert!(matches!(err, Error::Cancelled));
        let ok = cache.acquire("m", 1, || Ok(Fake(1))).unwrap();
        assert!(!ok.hit);
    }

    #[test]
    fn a_panicking_loader_does_not_wedge_the_key() {
        let cache: Arc<ModelCache<Fake>> = Arc::new(ModelCache::new(100, None));
        let c = Arc::clone(&cache);
        let r = std::thread::spawn(move || {
            let _ = c.acquire("m", 1, || -> Result<Fake> { panic!("boom") });
        })
        .join();
        assert!(r.is_err());
        let ok = cache.acquire("m", 1, || Ok(Fake(1))).unwrap();
        assert!(!ok.hit);
    }

    #[test]
    fn unload_removes_but_holders_keep_their_handle() {
        let cache = ModelCache::new(100, None);
        let a = cache.acquire("a", 5, || Ok(Fake(5))).unwrap();
        assert!(cache.unload("a"));
        assert!(!cache.unload("a"));
        assert_eq!(a.model.0, 5);
        assert_eq!(cache.stats().models, 0);
    }
}
