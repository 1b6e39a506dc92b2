//! The ledger: every byte the runtime owns, reserved before it is allocated.
//!
//! One [`Ledger`] per runtime. Everything that takes memory (model weights, a
//! sequence's KV cache, activation and logits workspace, image buffers, prefix-cache
//! blocks) holds a [`Reservation`] of a [`MemoryKind`] for as long as the memory lives;
//! dropping the reservation gives the bytes back. Admission is a question to the ledger
//! alone: a request is granted when
//!
//! ```text
//! reserved + requested <= cutline - margin,   margin = max(min_margin, unaccounted)
//! ```
//!
//! where `unaccounted` is the last observed resident memory less the ledger
//! ([`Ledger::observe_rss`]): memory the process holds that nobody reserved (allocator
//! slack, libraries' tables, an estimate that came out low). Folding it into the margin
//! keeps the *real* process under the cutline even where the accounting is short, and
//! lets it come back as soon as the memory does. Admission never starts from the
//! resident memory itself, which already contains what admitted runs allocated.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bytesize::ByteSize;
use crate::error::Error;

/// What a reservation holds bytes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum MemoryKind {
    /// The runtime itself at start-up (code, allocator, thread stacks).
    Runtime,
    /// A loaded model's weights and fixed tables, reserved before the load starts.
    Weights,
    /// A sequence's KV cache, for its planned length.
    KvCache,
    /// Activations and logits of the largest forward pass, and allocator slack.
    Workspace,
    /// Decoded images, preprocessed pixels and the vision encoder's states.
    Images,
    /// Blocks held by a prefix cache.
    PrefixCache,
}

impl MemoryKind {
    /// Every kind, in display order.
    pub const ALL: [MemoryKind; 6] = [
        MemoryKind::Runtime,
        MemoryKind::Weights,
        MemoryKind::KvCache,
        MemoryKind::Workspace,
        MemoryKind::Images,
        MemoryKind::PrefixCache,
    ];

    /// The kind's name: `runtime`, `weights`, `kv_cache`, `workspace`, `images`,
    /// `prefix_cache`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Runtime => "runtime",
            MemoryKind::Weights => "weights",
            MemoryKind::KvCache => "kv_cache",
            MemoryKind::Workspace => "workspace",
            MemoryKind::Images => "images",
            MemoryKind::PrefixCache => "prefix_cache",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemoryKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        MemoryKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::UnknownKind(s.to_owned()))
    }
}

const KINDS: usize = MemoryKind::ALL.len();

/// Bytes per [`MemoryKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindBytes([u64; KINDS]);

impl KindBytes {
    /// Nothing.
    pub const ZERO: KindBytes = KindBytes([0; KINDS]);

    /// `bytes` of one kind.
    pub fn of(kind: MemoryKind, bytes: u64) -> Self {
        let mut k = Self::ZERO;
        k.0[kind.index()] = bytes;
        k
    }

    /// The same with `bytes` more of `kind`.
    pub fn with(mut self, kind: MemoryKind, bytes: u64) -> Self {
        self.0[kind.index()] = self.0[kind.index()].saturating_add(bytes);
        self
    }

    /// Bytes of `kind`.
    pub fn get(&self, kind: MemoryKind) -> u64 {
        self.0[kind.index()]
    }

    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// `(kind, bytes)` for every kind with bytes.
    pub fn iter(&self) -> impl Iterator<Item = (MemoryKind, u64)> + '_ {
        MemoryKind::ALL
            .into_iter()
            .map(|k| (k, self.get(k)))
            .filter(|&(_, b)| b > 0)
    }
}

/// Why the ledger said no, with the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The bytes asked for.
    pub needed: u64,
    /// Bytes reserved when asked.
    pub reserved: u64,
    /// The margin kept below the cutline when asked (`max(min_margin, unaccounted)`).
    pub margin: u64,
    /// Resident memory nobody reserved, as last observed.
    pub unaccounted: u64,
    /// The cutline.
    pub cutline: u64,
}

impl Refusal {
    /// Bytes that were left: `cutline - margin - reserved`.
    pub fn available(&self) -> u64 {
        self.cutline
            .saturating_sub(self.margin)
            .saturating_sub(self.reserved)
    }

    /// Whether the request could never fit, even with nothing else reserved.
    pub fn never_fits(&self) -> bool {
        self.needed > self.cutline.saturating_sub(self.margin)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "needs {} but only {} is left under the cutline of {} ({} reserved, margin {} of which {} unaccounted)",
            ByteSize(self.needed),
            ByteSize(self.available()),
            ByteSize(self.cutline),
            ByteSize(self.reserved),
            ByteSize(self.margin),
            ByteSize(self.unaccounted)
        )
    }
}

/// The ledger's figures at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerSnapshot {
    /// The cutline.
    pub cutline: u64,
    /// The smallest margin kept below the cutline.
    pub min_margin: u64,
    /// The margin in force: `max(min_margin, unaccounted)`.
    pub margin: u64,
    /// Bytes reserved, by kind.
    pub reserved: KindBytes,
    /// The last observed resident memory less the ledger (0 when below it).
    pub unaccounted: u64,
    /// The last observed resident memory.
    pub rss: u64,
    /// The most bytes ever reserved at once.
    pub peak_reserved: u64,
    /// Admitted runs in flight.
    pub runs: u64,
}

impl LedgerSnapshot {
    /// Bytes reserved, all kinds.
    pub fn reserved_total(&self) -> u64 {
        self.reserved.total()
    }

    /// Bytes that may still be reserved: `cutline - margin - reserved`.
    pub fn available(&self) -> u64 {
        self.cutline
            .saturating_sub(self.margin)
            .saturating_sub(self.reserved_total())
    }

    /// The KV caches' share of the memory they may have, 0 to 1: the bytes reserved
    /// for KV caches over those bytes plus what the KV caches could still take, which
    /// is [`available`](Self::available) and the prefix cache's blocks (dropped when a
    /// run needs them). Weights, workspace, images and the runtime's own memory are
    /// not KV capacity. 1 when there is no room for a KV cache at all, so that a
    /// router reading it sends no more work here.
    pub fn kv_cache_usage(&self) -> f64 {
        let kv = self.reserved.get(MemoryKind::KvCache);
        let capacity = kv
            .saturating_add(self.reserved.get(MemoryKind::PrefixCache))
            .saturating_add(self.available());
        if capacity == 0 {
            1.0
        } else {
            (kv as f64 / capacity as f64).clamp(0.0, 1.0)
        }
    }
}

#[derive(Debug)]
struct State {
    reserved: KindBytes,
    unaccounted: u64,
    rss: u64,
    peak_reserved: u64,
    runs: u64,
}

#[derive(Debug)]
struct Inner {
    cutline: u64,
    min_margin: u64,
    state: Mutex<State>,
}

/// The one account of the runtime's memory. See the module docs.
///
/// Cloning shares the account.
#[derive(Debug, Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

/// The default smallest margin: 6% of the cutline, at least 16 MiB (and at most a
/// quarter of it): room for what the estimates and a sampled RSS miss for a moment (a
/// load's transient buffers, allocator slack). Measured: with 4% the stress runs at
/// 300 and 400 MiB peaked 2.4 and 0.8 MiB over the cutline.
pub fn default_min_margin(cutline: u64) -> u64 {
    (cutline / 100 * 6).max(16 << 20).min(cutline / 4)
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn margin(&self, min_margin: u64) -> u64 {
        self.unaccounted.max(min_margin)
    }
}

impl Ledger {
    /// A ledger for `cutline` bytes with the [`default_min_margin`].
    pub fn new(cutline: u64) -> Self {
        Self::with_min_margin(cutline, default_min_margin(cutline))
    }

    /// A ledger for `cutline` bytes that always keeps `min_margin` free.
    pub fn with_min_margin(cutline: u64, min_margin: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                cutline,
                min_margin: min_margin.min(cutline),
                state: Mutex::new(State {
                    reserved: KindBytes::ZERO,
                    unaccounted: 0,
                    rss: 0,
                    peak_reserved: 0,
                    runs: 0,
                }),
            }),
        }
    }

    /// The cutline.
    pub fn cutline(&self) -> u64 {
        self.inner.cutline
    }

    /// Bytes reserved now, all kinds.
    pub fn reserved(&self) -> u64 {
        lock(&self.inner.state).reserved.total()
    }

    /// Admitted runs in flight (reservations made with [`Ledger::admit`]).
    pub fn runs(&self) -> u64 {
        lock(&self.inner.state).runs
    }

    /// Everything at once.
    pub fn snapshot(&self) -> LedgerSnapshot {
        let s = lock(&self.inner.state);
        LedgerSnapshot {
            cutline: self.inner.cutline,
            min_margin: self.inner.min_margin,
            margin: s.margin(self.inner.min_margin),
            reserved: s.reserved,
            unaccounted: s.unaccounted,
            rss: s.rss,
            peak_reserved: s.peak_reserved,
            runs: s.runs,
        }
    }

    /// Records the process's resident memory now: what it holds beyond the ledger
    /// becomes the unaccounted memory, folded into the margin. Returns it.
    pub fn observe_rss(&self, rss: u64) -> u64 {
        let mut s = lock(&self.inner.state);
        s.rss = rss;
        s.unaccounted = rss.saturating_sub(s.reserved.total());
        s.unaccounted
    }

    fn refusal(&self, s: &State, needed: u64) -> Refusal {
        Refusal {
            needed,
            reserved: s.reserved.total(),
            margin: s.margin(self.inner.min_margin),
            unaccounted: s.unaccounted,
            cutline: self.inner.cutline,
        }
    }

    fn fits(&self, s: &State, bytes: u64) -> bool {
        s.reserved
            .total()
            .checked_add(bytes)
            .and_then(|t| t.checked_add(s.margin(self.inner.min_margin)))
            .is_some_and(|t| t <= self.inner.cutline)
    }

    fn add(&self, s: &mut State, parts: KindBytes) {
        for k in MemoryKind::ALL {
            s.reserved.0[k.index()] = s.reserved.0[k.index()].saturating_add(parts.get(k));
        }
        s.peak_reserved = s.peak_reserved.max(s.reserved.total());
    }

    /// Reserves `bytes` of `kind` when they fit under the cutline less the margin.
    ///
    /// # Errors
    /// The [`Refusal`], with the numbers, when they do not.
    pub fn try_reserve(&self, kind: MemoryKind, bytes: u64) -> Result<Reservation, Refusal> {
        self.try_reserve_parts(KindBytes::of(kind, bytes))
    }

    /// Reserves several kinds at once, all or nothing.
    ///
    /// # Errors
    /// The [`Refusal`] when their sum does not fit.
    pub fn try_reserve_parts(&self, parts: KindBytes) -> Result<Reservation, Refusal> {
        let mut s = lock(&self.inner.state);
        if !self.fits(&s, parts.total()) {
            return Err(self.refusal(&s, parts.total()));
        }
        self.add(&mut s, parts);
        Ok(Reservation {
            parts,
            ledger: self.clone(),
            run: false,
        })
    }

    /// Records bytes that exist already (the runtime's own memory at start-up, a
    /// model that came out larger than its estimate): they are reserved whether or
    /// not they fit, so that the ledger stays true and later admissions see them.
    pub fn reserve_existing(&self, kind: MemoryKind, bytes: u64) -> Reservation {
        let parts = KindBytes::of(kind, bytes);
        let mut s = lock(&self.inner.state);
        self.add(&mut s, parts);
        // They were in the resident memory already, so no longer unaccounted.
        s.unaccounted = s.unaccounted.saturating_sub(bytes);
        Reservation {
            parts,
            ledger: self.clone(),
            run: false,
        }
    }

    /// Admits a run: reserves the first of `plans` (the plan asked for first, then
    /// cheaper ones in the order to try) that fits, atomically with the check.
    ///
    /// A plan is never admitted when the resident memory it predicts (reserved +
    /// the plan + the margin) passes the cutline.
    pub fn admit(&self, plans: &[PlanOption]) -> Admission {
        let mut s = lock(&self.inner.state);
        for (index, plan) in plans.iter().enumerate() {
            if self.fits(&s, plan.parts.total()) {
                let reserved_before = s.reserved.total();
                let unaccounted = s.unaccounted;
                self.add(&mut s, plan.parts);
                s.runs += 1;
                return Admission::Admit {
                    index,
                    predicted_peak: reserved_before + unaccounted + plan.parts.total(),
                    reservation: Reservation {
                        parts: plan.parts,
                        ledger: self.clone(),
                        run: true,
                    },
                };
            }
        }
        let needed = plans.first().map_or(0, |p| p.parts.total());
        Admission::Refuse(self.refusal(&s, needed))
    }

    /// Whether `bytes` more would fit now.
    pub fn fits_now(&self, bytes: u64) -> bool {
        self.fits(&lock(&self.inner.state), bytes)
    }
}

/// A plan the caller could run, with the bytes it would reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOption {
    /// A name the caller understands (`as asked`, `kv_budget=512+sinks`,
    /// `max_tokens=64`).
    pub name: String,
    /// The bytes it reserves, by kind.
    pub parts: KindBytes,
}

impl PlanOption {
    /// A plan named `name` reserving `parts`.
    pub fn new(name: impl Into<String>, parts: KindBytes) -> Self {
        Self {
            name: name.into(),
            parts,
        }
    }

    /// The plan's bytes.
    pub fn bytes(&self) -> u64 {
        self.parts.total()
    }
}

/// The ledger's answer to [`Ledger::admit`].
#[derive(Debug)]
pub enum Admission {
    /// Run plan `index` (0: the plan asked for; more: a cheaper one); its bytes stay
    /// reserved until the [`Reservation`] is dropped.
    Admit {
        /// Which plan.
        index: usize,
        /// The resident memory the run is predicted to reach: everything reserved
        /// before it, the unaccounted memory, and its own bytes. Never above the
        /// cutline.
        predicted_peak: u64,
        /// The run's bytes.
        reservation: Reservation,
    },
    /// No plan fits now.
    Refuse(Refusal),
}

/// Bytes held in the ledger; given back when dropped (also during a panic).
#[derive(Debug)]
pub struct Reservation {
    parts: KindBytes,
    ledger: Ledger,
    run: bool,
}

impl Reservation {
    /// The bytes held, all kinds.
    pub fn bytes(&self) -> u64 {
        self.parts.total()
    }

    /// The bytes held, by kind.
    pub fn parts(&self) -> KindBytes {
        self.parts
    }

    /// Holds `bytes` more of `kind` when they fit (a KV cache growing by a block).
    ///
    /// # Errors
    /// The [`Refusal`] when they do not; the reservation is unchanged.
    pub fn try_grow(&mut self, kind: MemoryKind, bytes: u64) -> Result<(), Refusal> {
        let mut s = lock(&self.ledger.inner.state);
        if !self.ledger.fits(&s, bytes) {
            return Err(self.ledger.refusal(&s, bytes));
        }
        let add = KindBytes::of(kind, bytes);
        self.ledger.add(&mut s, add);
        self.parts = self.parts.with(kind, bytes);
        Ok(())
    }

    /// Sets the bytes held of `kind` to `bytes`, without asking: for memory that
    /// exists already (a model measured after its load, a cache that shrank).
    pub fn settle(&mut self, kind: MemoryKind, bytes: u64) {
        let mut s = lock(&self.ledger.inner.state);
        let i = kind.index();
        let held = self.parts.0[i];
        s.reserved.0[i] = s.reserved.0[i].saturating_sub(held).saturating_add(bytes);
        if bytes > held {
            s.unaccounted = s.unaccounted.saturating_sub(bytes - held);
        }
        s.peak_reserved = s.peak_reserved.max(s.reserved.total());
        self.parts.0[i] = bytes;
    }

    /// Gives back everything of `kind` beyond `bytes`.
    pub fn shrink_to(&mut self, kind: MemoryKind, bytes: u64) {
        if bytes < self.parts.get(kind) {
            self.settle(kind, bytes);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut s = lock(&self.ledger.inner.state);
        for k in MemoryKind::ALL {
            s.reserved.0[k.index()] = s.reserved.0[k.index()].saturating_sub(self.parts.get(k));
        }
        if self.run {
            s.runs = s.runs.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_and_release() {
        let ledger = Ledger::with_min_margin(1000, 100);
        let a = ledger.try_reserve(MemoryKind::Weights, 600).unwrap();
        assert_eq!(ledger.reserved(), 600);
        let err = ledger.try_reserve(MemoryKind::KvCache, 301).unwrap_err();
        assert_eq!(err.available(), 300);
        assert!(err.to_string().contains("needs 301 B"), "{err}");
        let b = ledger.try_reserve(MemoryKind::KvCache, 300).unwrap();
        assert_eq!(ledger.snapshot().reserved.get(MemoryKind::KvCache), 300);
        drop(a);
        drop(b);
        assert_eq!(ledger.reserved(), 0);
        assert_eq!(ledger.snapshot().peak_reserved, 900);
    }

    #[test]
    fn kv_cache_usage_is_kv_over_the_room_kv_may_have() {
        let ledger = Ledger::with_min_margin(1000, 100);
        assert_eq!(ledger.snapshot().kv_cache_usage(), 0.0);
        // Weights are not KV capacity: 900 usable, 500 of it weights, 400 left.
        let _w = ledger.try_reserve(MemoryKind::Weights, 500).unwrap();
        let kv = ledger.try_reserve(MemoryKind::KvCache, 100).unwrap();
        // 100 of the 400 the KV caches may have.
        assert_eq!(ledger.snapshot().kv_cache_usage(), 0.25);
        // Prefix blocks can be dropped for a run: still room for KV.
        let _p = ledger.try_reserve(MemoryKind::PrefixCache, 100).unwrap();
        assert_eq!(ledger.snapshot().kv_cache_usage(), 0.25);
        let _k2 = ledger.try_reserve(MemoryKind::KvCache, 200).unwrap();
        assert_eq!(ledger.snapshot().kv_cache_usage(), 0.75);
        drop(kv);
        assert_eq!(ledger.snapshot().kv_cache_usage(), 0.5);
        // No room for KV at all reads as full.
        let full = Ledger::with_min_margin(1000, 100);
        let _w = full.try_reserve(MemoryKind::Weights, 900).unwrap();
        assert_eq!(full.snapshot().kv_cache_usage(), 1.0);
    }

    #[test]
    fn unaccounted_memory_widens_the_margin() {
        let ledger = Ledger::with_min_margin(1000, 50);
        let _w = ledger.try_reserve(MemoryKind::Weights, 400).unwrap();
        assert_eq!(ledger.observe_rss(600), 200);
        assert_eq!(ledger.snapshot().margin, 200);
        assert!(!ledger.fits_now(401));
        assert!(ledger.fits_now(400));
        // Memory came back: the margin is the minimum again.
        assert_eq!(ledger.observe_rss(420), 20);
        assert_eq!(ledger.snapshot().margin, 50);
        assert!(ledger.fits_now(550));
    }

    #[test]
    fn admit_takes_the_first_plan_that_fits() {
        let ledger = Ledger::with_min_margin(1000, 0);
        let _w = ledger.reserve_existing(MemoryKind::Weights, 500);
        let plans = [
            PlanOption::new("as asked", KindBytes::of(MemoryKind::KvCache, 800)),
            PlanOption::new("smaller", KindBytes::of(MemoryKind::KvCache, 400)),
        ];
        match ledger.admit(&plans) {
            Admission::Admit {
                index,
                predicted_peak,
                reservation,
            } => {
                assert_eq!(index, 1);
                assert_eq!(predicted_peak, 900);
                assert_eq!(reservation.bytes(), 400);
                assert_eq!(ledger.runs(), 1);
            }
            Admission::Refuse(r) => panic!("{r}"),
        }
        assert_eq!(ledger.runs(), 0);
        assert_eq!(ledger.reserved(), 500);
    }

    #[test]
    fn grow_settle_shrink() {
        let ledger = Ledger::with_min_margin(1000, 0);
        let mut r = ledger.try_reserve(MemoryKind::KvCache, 100).unwrap();
        r.try_grow(MemoryKind::KvCache, 200).unwrap();
        r.try_grow(MemoryKind::Workspace, 50).unwrap();
        assert_eq!(ledger.reserved(), 350);
        assert!(r.try_grow(MemoryKind::KvCache, 651).is_err());
        assert_eq!(r.bytes(), 350);
        r.settle(MemoryKind::KvCache, 1000);
        assert_eq!(ledger.reserved(), 1050);
        r.shrink_to(MemoryKind::KvCache, 10);
        assert_eq!(ledger.reserved(), 60);
        r.shrink_to(MemoryKind::KvCache, 500); // never grows
        assert_eq!(ledger.reserved(), 60);
        drop(r);
        assert_eq!(ledger.reserved(), 0);
    }

    #[test]
    fn kinds_parse_and_print() {
        for k in MemoryKind::ALL {
            assert_eq!(k.as_str().parse::<MemoryKind>().unwrap(), k);
        }
        assert!("heap".parse::<MemoryKind>().is_err());
    }
}
