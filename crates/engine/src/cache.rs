//! The lazy model cache: load on first use, share afterwards, evict idle models.
//!
//! [`ModelCache::acquire`] loads a model the first time its key is asked for and hands
//! out a shared [`Arc`] afterwards. Concurrent acquires of the same key load it once:
//! the first caller loads, the others wait for its result.
//!
//! The cache keeps no budget of its own: a load first reserves the model's estimated
//! bytes in the runtime's [`Ledger`] ([`MemoryKind::Weights`]), and only when the
//! ledger refuses are idle models (held by nobody but the cache, and not pinned)
//! evicted, least-recently-used first, until the reservation fits. A model is never
//! evicted for any other reason than a load (or a run, through
//! [`ModelCache::evict_lru_idle`]) needing its bytes, or its keep-alive running out.
//! After the load the reservation is settled to the model's measured bytes, and it is
//! given back when the model is dropped: if somebody still holds a model that was
//! unloaded, its bytes stay reserved until the last holder lets go.
//!
//! The cache is generic over the model type so that its policy can be tested without
//! real weights; the engine uses it with its loaded models.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use afo_guard::{Ledger, MemoryKind, Reservation};

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
    /// Bytes reserved by the models in the cache now, loads in flight and unloaded
    /// models somebody still holds.
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
    /// Whether the model is pinned (never evicted).
    pub pinned: bool,
}

/// A lazy, shared cache of loaded models whose bytes are reserved in a [`Ledger`].
#[derive(Debug)]
pub struct ModelCache<M> {
    state: Mutex<State<M>>,
    ledger: Ledger,
    keep_alive: Option<Duration>,
}

#[derive(Debug)]
struct State<M> {
    slots: HashMap<String, Slot<M>>,
    /// Unloaded models somebody still holds, with their bytes still reserved.
    draining: Vec<(Arc<M>, Reservation)>,
    pinned: std::collections::HashSet<String>,
    stats: CacheStats,
}

#[derive(Debug)]
enum Slot<M> {
    /// Being loaded by one caller; the reservation holds its estimate.
    Loading {
        pending: Arc<PendingLoad<M>>,
        reservation: Reservation,
    },
    Ready(Entry<M>),
}

#[derive(Debug)]
struct Entry<M> {
    model: Arc<M>,
    reservation: Reservation,
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
    /// A cache whose models reserve their bytes in `ledger`, dropping idle models
    /// after `keep_alive` (never, when `None`).
    pub fn new(ledger: Ledger, keep_alive: Option<Duration>) -> Self {
        Self {
            state: Mutex::new(State {
                slots: HashMap::new(),
                draining: Vec::new(),
                pinned: std::collections::HashSet::new(),
                stats: CacheStats::default(),
            }),
            ledger,
            keep_alive,
        }
    }

    /// The ledger the models' bytes are reserved in.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Keeps the model under `key` loaded once it is: never evicted, never expired.
    /// (Pinning a key not loaded yet applies when it loads.)
    pub fn pin(&self, key: &str) {
        lock(&self.state).pinned.insert(key.to_owned());
    }

    /// Undoes [`ModelCache::pin`].
    pub fn unpin(&self, key: &str) {
        lock(&self.state).pinned.remove(key);
    }

    /// Evicts the least recently used idle model (not in use, not pinned) to give its
    /// bytes back to the ledger; returns its key and bytes, or `None` when no model is
    /// idle. For a caller that needs room (a run, or a load into another cache over
    /// the same ledger).
    pub fn evict_lru_idle(&self) -> Option<(String, u64)> {
        let mut state = lock(&self.state);
        let evicted = evict_one(&mut state);
        drop(state);
        if evicted.is_some() {
            afo_guard::release_free_memory();
        }
        evicted
    }

    /// When the least recently used idle model was last used, if any is idle.
    pub fn oldest_idle(&self) -> Option<Instant> {
        let state = lock(&self.state);
        idle(&state).map(|(t, _)| t)
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

        let reservation = self.make_room(&mut state, key, estimated_bytes)?;
        let pending = Arc::new(PendingLoad {
            outcome: Mutex::new(None),
            done: Condvar::new(),
        });
        state.slots.insert(
            key.to_owned(),
            Slot::Loading {
                pending: Arc::clone(&pending),
                reservation,
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
        let reservation = match state.slots.remove(key) {
            Some(Slot::Loading { reservation, .. }) => Some(reservation),
            Some(other) => {
                // Not ours (unreachable: only this caller replaces a Loading slot).
                state.slots.insert(key.to_owned(), other);
                None
            }
            None => None,
        };
        match loaded {
            Ok(model) => {
                let model = Arc::new(model);
                let bytes = model.resident_bytes();
                let mut reservation = reservation
                    .unwrap_or_else(|| self.ledger.reserve_existing(MemoryKind::Weights, 0));
                // The model exists now: its measured bytes replace the estimate.
                reservation.settle(MemoryKind::Weights, bytes);
                state.slots.insert(
                    key.to_owned(),
                    Slot::Ready(Entry {
                        model: Arc::clone(&model),
                        reservation,
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
                drop(state);
                drop(reservation);
                afo_guard::release_free_memory();
                pending.finish(Err(err.to_string()));
                Err(err)
            }
        }
    }

    /// Drops the model under `key` from the cache; callers holding it keep their
    /// handle. Returns whether a loaded model was removed.
    pub fn unload(&self, key: &str) -> bool {
        let mut state = lock(&self.state);
        if !matches!(state.slots.get(key), Some(Slot::Ready(_))) {
            return false;
        }
        if let Some(Slot::Ready(e)) = state.slots.remove(key) {
            retire(&mut state, e);
        }
        drop(state);
        afo_guard::release_free_memory();
        true
    }

    /// Drops every idle model whose keep-alive has run out; returns how many.
    pub fn evict_expired(&self) -> usize {
        let mut state = lock(&self.state);
        self.expire(&mut state, Instant::now())
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        let mut state = lock(&self.state);
        drain(&mut state);
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
                    bytes: e.reservation.bytes(),
                    in_use: Arc::strong_count(&e.model) > 1,
                    idle_for: now.saturating_duration_since(e.last_used),
                    load_ms: e.load_ms,
                    pinned: state.pinned.contains(key),
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
                        && !state.pinned.contains(key)
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
        drain(state);
        if !expired.is_empty() {
            afo_guard::release_free_memory();
        }
        expired.len()
    }

    /// Reserves `needed` bytes of weights for `key`, evicting idle models least
    /// recently used first while the ledger refuses.
    fn make_room(&self, state: &mut State<M>, key: &str, needed: u64) -> Result<Reservation> {
        drain(state);
        let mut evicted = false;
        let result = loop {
            match self.ledger.try_reserve(MemoryKind::Weights, needed) {
                Ok(r) => break Ok(r),
                Err(refusal) => {
                    if evict_one(state).is_none() {
                        break Err(Error::ModelTooLarge {
                            model: key.to_owned(),
                            needed_bytes: needed,
                            refusal,
                        });
                    }
                    evicted = true;
                }
            }
        };
        if evicted {
            afo_guard::release_free_memory();
        }
        result
    }
}

/// The least recently used idle model: not in use, not pinned.
fn idle<M>(state: &State<M>) -> Option<(Instant, String)> {
    state
        .slots
        .iter()
        .filter_map(|(k, slot)| match slot {
            Slot::Ready(e) if Arc::strong_count(&e.model) == 1 && !state.pinned.contains(k) => {
                Some((e.last_used, k.clone()))
            }
            _ => None,
        })
        .min()
}

/// Evicts the least recently used idle model; returns its key and bytes.
fn evict_one<M>(state: &mut State<M>) -> Option<(String, u64)> {
    let (_, key) = idle(state)?;
    let Some(Slot::Ready(e)) = state.slots.remove(&key) else {
        return None;
    };
    let bytes = e.reservation.bytes();
    state.stats.evictions += 1;
    tracing::debug!(model = %key, bytes, "model cache: evicted the least recently used idle model");
    retire(state, e);
    Some((key, bytes))
}

/// Drops a model taken out of the cache: its bytes go back now when nobody holds it,
/// or when its last holder lets go.
fn retire<M>(state: &mut State<M>, e: Entry<M>) {
    if Arc::strong_count(&e.model) > 1 {
        state.draining.push((e.model, e.reservation));
    }
}

/// Gives back the bytes of unloaded models nobody holds any more.
fn drain<M>(state: &mut State<M>) {
    state.draining.retain(|(m, _)| Arc::strong_count(m) > 1);
}

/// Bytes reserved by loaded models, loads in flight and draining models.
fn resident<M>(state: &State<M>) -> u64 {
    let slots: u64 = state
        .slots
        .values()
        .map(|s| match s {
            Slot::Ready(e) => e.reservation.bytes(),
            Slot::Loading { reservation, .. } => reservation.bytes(),
        })
        .sum();
    slots + state.draining.iter().map(|(_, r)| r.bytes()).sum::<u64>()
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ledger(cutline: u64) -> Ledger {
        Ledger::with_min_margin(cutline, 0)
    }

    #[derive(Debug)]
    struct Fake(u64);
    impl CacheWeight for Fake {
        fn resident_bytes(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn loads_once_then_hits() {
        let cache = ModelCache::new(ledger(100), None);
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
        let cache = Arc::new(ModelCache::new(ledger(100), None));
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
        let cache = ModelCache::new(ledger(30), None);
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
        let cache = ModelCache::new(ledger(15), None);
        let _a = cache.acquire("a", 10, || Ok(Fake(10))).unwrap();
        let err = cache.acquire("b", 10, || Ok(Fake(10))).unwrap_err();
        match err {
            Error::ModelTooLarge {
                needed_bytes,
                refusal,
                ..
            } => {
                assert_eq!(needed_bytes, 10);
                assert_eq!((refusal.reserved, refusal.cutline), (10, 15));
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err_text(&cache).contains("needs 10 B"));
    }

    fn err_text(cache: &ModelCache<Fake>) -> String {
        match cache.acquire("z", 10, || Ok(Fake(10))) {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        }
    }

    #[test]
    fn a_model_is_evicted_only_when_a_load_needs_its_bytes() {
        // Plenty of room: loading more models never evicts an idle one.
        let cache = ModelCache::new(ledger(100), None);
        for key in ["a", "b", "c", "d"] {
            drop(cache.acquire(key, 20, || Ok(Fake(20))).unwrap());
        }
        assert_eq!(cache.stats().evictions, 0);
        assert_eq!(cache.stats().models, 4);
        assert_eq!(cache.ledger().reserved(), 80);
        // The next load needs 30 of the 20 free: exactly one idle model (the least
        // recently used, `a`) goes, and its bytes go back to the ledger.
        drop(cache.acquire("e", 30, || Ok(Fake(30))).unwrap());
        let keys: Vec<String> = cache.loaded().into_iter().map(|e| e.key).collect();
        assert_eq!(cache.stats().evictions, 1);
        assert!(!keys.contains(&"a".to_owned()), "{keys:?}");
        assert_eq!(cache.ledger().reserved(), 90);
    }

    #[test]
    fn pinned_models_stay() {
        let cache = ModelCache::new(ledger(30), Some(Duration::from_millis(1)));
        cache.pin("p");
        drop(cache.acquire("p", 20, || Ok(Fake(20))).unwrap());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(cache.evict_expired(), 0);
        assert!(cache.acquire("q", 20, || Ok(Fake(20))).is_err());
        assert!(cache.evict_lru_idle().is_none());
        cache.unpin("p");
        assert_eq!(cache.evict_lru_idle(), Some(("p".to_owned(), 20)));
        assert_eq!(cache.ledger().reserved(), 0);
    }

    #[test]
    fn the_reservation_settles_to_the_measured_bytes_and_outlives_an_unload() {
        let cache = ModelCache::new(ledger(100), None);
        let a = cache.acquire("a", 50, || Ok(Fake(30))).unwrap();
        assert_eq!(cache.ledger().reserved(), 30);
        assert!(cache.unload("a"));
        // Still held: its bytes stay reserved until the holder lets go.
        assert_eq!(cache.stats().resident_bytes, 30);
        assert_eq!(cache.ledger().reserved(), 30);
        drop(a);
        assert_eq!(cache.stats().resident_bytes, 0);
        assert_eq!(cache.ledger().reserved(), 0);
    }

    #[test]
    fn keep_alive_expires_idle_models() {
        let cache = ModelCache::new(ledger(100), Some(Duration::from_millis(20)));
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
        let cache: ModelCache<Fake> = ModelCache::new(ledger(100), None);
        let err = cache.acquire("m", 1, || Err(Error::Cancelled)).unwrap_err();
        assert!(matches!(err, Error::Cancelled));
        let ok = cache.acquire("m", 1, || Ok(Fake(1))).unwrap();
        assert!(!ok.hit);
    }

    #[test]
    fn a_panicking_loader_does_not_wedge_the_key() {
        let cache: Arc<ModelCache<Fake>> = Arc::new(ModelCache::new(ledger(100), None));
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
        let cache = ModelCache::new(ledger(100), None);
        let a = cache.acquire("a", 5, || Ok(Fake(5))).unwrap();
        assert!(cache.unload("a"));
        assert!(!cache.unload("a"));
        assert_eq!(a.model.0, 5);
        assert_eq!(cache.stats().models, 0);
    }
}
