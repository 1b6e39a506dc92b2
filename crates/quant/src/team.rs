//! A team of the rayon pool's threads for a run of many short parallel regions: a
//! decode step runs about five regions a layer (the products, the attention), each a
//! few to a hundred microseconds. Through rayon each region is a fork and a join: the
//! idle threads yield to the kernel or sleep between regions and are woken for the
//! next. In a team, [`run`] keeps the pool's other threads spinning on the team's state
//! for as long as its closure runs, and each region ([`for_each_index`],
//! [`for_each_mut`]) publishes its items there. The items are cut into one contiguous
//! share per thread (as rayon's halving cuts them: a product's tasks are consecutive
//! panels, and each task's prefetches reach into the next); a thread that joins takes
//! the next share nobody took and runs it in order, then takes items from the back of
//! the others' shares until none is left, and the region ends when all are done. No
//! system call, no sleep, nothing allocated per region.
//!
//! Outside a team (no [`run`] on this thread's stack) the same functions split their
//! items on the current rayon pool as `par_iter` would. Inside a region's item they run
//! the items in order on the calling thread. Rayon's own parallel iterators inside a
//! team run on the calling thread alone (the helpers take no rayon work while they
//! spin): [`run`] is for code whose parallel work goes through this module. The results
//! never depend on which thread runs an item: callers give each item its own output.
//!
//! A thread of the pool that is not free when [`run`] starts (busy with other work)
//! joins late or not at all; the caller's thread then runs the items itself. Nothing
//! waits for a thread that has not taken an item.
//!
//! Measured on SmolLM2-135M (2 threads, the same process alternating steps with and
//! without the team): a batched step of eight sequences 3.5% faster, one sequence's
//! decode 2.8-3.9% (Q8_0, Q4_0, F16); see `docs/benchmarks.md`.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

/// Spins (`pause`) before a waiting thread starts to yield its core to the kernel
/// between checks: long enough for the gap between two regions of a step, short
/// enough not to hold a core through a long serial stretch.
const SPINS_BEFORE_YIELD: u32 = 1 << 16;

thread_local! {
    /// The team whose [`run`] this thread is running, if any.
    static TEAM: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is running an item of a region (nested regions run in order).
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

/// One region: the items' function.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

/// A value on a cache line of its own (the threads' shares and the finished count are
/// written by different threads: on one line, every take would move it between cores).
#[repr(align(128))]
struct Line<T>(T);

/// The state the team's threads share.
struct Shared {
    /// The number of regions published so far (the current region's number).
    epoch: AtomicUsize,
    /// The number of the last region closed: no thread may start on it any more.
    closed: AtomicUsize,
    /// Helpers inside a region (registered before they read its job).
    active: AtomicUsize,
    /// The current region's job (valid while the region is open).
    job: AtomicPtr<Job<'static>>,
    /// Each thread's share of the current region's items: `front << 32 | back`, the
    /// items `front..back` not yet taken (see [`Shared::work`]).
    shares: Vec<Line<AtomicU64>>,
    /// The next share to hand to a thread that joins the region.
    next_share: AtomicUsize,
    /// Items finished (added once per thread and region).
    done: Line<AtomicUsize>,
    /// Set when [`run`]'s closure has returned: the helpers leave.
    stop: AtomicBool,
    /// The first panic of an item, re-raised on the caller's thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Shared {
    /// A team of `threads` threads.
    fn new(threads: usize) -> Self {
        Self {
            epoch: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            shares: (0..threads.max(1))
                .map(|_| Line(AtomicU64::new(0)))
                .collect(),
            next_share: AtomicUsize::new(0),
            done: Line(AtomicUsize::new(0)),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        }
    }

    /// Takes and runs items of `job` until none is left: the next share nobody took,
    /// in order, as many as are left, then items from the back of the others' shares
    /// (items handed out one by one across threads, so that neither thread's run was
    /// contiguous, made a batched step 15% slower).
    fn work(&self, job: &Job<'_>) {
        let outer = IN_REGION.with(|r| r.replace(true));
        let mut finished = 0;
        let mut run = |i: usize| {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.f)(i))) {
                self.keep_panic(payload);
            }
            finished += 1;
        };
        loop {
            let s = self.next_share.fetch_add(1, Ordering::Relaxed);
            let Some(share) = self.shares.get(s) else {
                break;
            };
            while let Some(i) = take(&share.0, true) {
                run(i);
            }
        }
        for share in &self.shares {
            while let Some(i) = take(&share.0, false) {
                run(i);
            }
        }
        // Publishes the items' writes to the thread that waits for the region.
        self.done.0.fetch_add(finished, Ordering::Release);
        IN_REGION.with(|r| r.set(outer));
    }

    fn keep_panic(&self, payload: Box<dyn Any + Send>) {
        if let Ok(mut slot) = self.panic.lock() {
            slot.get_or_insert(payload);
        }
    }

    /// Runs one region from the caller's thread: publishes it, takes items with the
    /// helpers, and returns when every item is done and no helper holds the job.
    fn region(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
        let job = Job { f };
        let parts = self.shares.len();
        for (p, share) in self.shares.iter().enumerate() {
            let (lo, hi) = (n * p / parts, n * (p + 1) / parts);
            share
                .0
                .store(((lo as u64) << 32) | hi as u64, Ordering::Relaxed);
        }
        self.next_share.store(0, Ordering::Relaxed);
        self.done.0.store(0, Ordering::Relaxed);
        let ptr = std::ptr::from_ref(&job).cast::<Job<'static>>().cast_mut();
        self.job.store(ptr, Ordering::Relaxed);
        let e = self.epoch.load(Ordering::Relaxed) + 1;
        // Publishes the job and the reset counters with the region's number.
        self.epoch.store(e, Ordering::SeqCst);
        self.work(&job);
        wait_until(|| self.done.0.load(Ordering::Acquire) >= n);
        // No helper may start on the region after this (a helper registers in
        // `active` before it reads `closed`: either it sees the region closed, or the
        // wait below sees it registered).
        self.closed.store(e, Ordering::SeqCst);
        wait_until(|| self.active.load(Ordering::SeqCst) == 0);
        let panic = self.panic.lock().ok().and_then(|mut p| p.take());
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
    }

    /// A helper's loop: joins every region published until the team stops.
    fn help(&self) {
        // A helper job picked up by the team's own thread (inside a rayon call of the
        // closure) leaves at once: that thread is running the closure.
        if TEAM.with(|t| std::ptr::eq(t.get(), self)) {
            return;
        }
        let mut seen = 0;
        let mut spins = 0u32;
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                self.active.fetch_add(1, Ordering::SeqCst);
                if self.closed.load(Ordering::SeqCst) < e {
                    // SAFETY: region `e` is open (not closed when this helper
                    // registered), so its job lives on the caller's stack until the
                    // caller sees `active` drop back, after this helper's last use.
                    let job = unsafe { &*self.job.load(Ordering::Acquire) };
                    self.work(job);
                }
                self.active.fetch_sub(1, Ordering::Release);
                spins = 0;
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Takes one item of a share (`front << 32 | back`): the first when `front` is true
/// (the share's own thread), otherwise the last (a thread done with its own).
fn take(share: &AtomicU64, front: bool) -> Option<usize> {
    let mut cur = share.load(Ordering::Relaxed);
    loop {
        let (lo, hi) = (cur >> 32, cur & 0xFFFF_FFFF);
        if lo >= hi {
            return None;
        }
        let (next, item) = if front {
            (((lo + 1) << 32) | hi, lo)
        } else {
            ((lo << 32) | (hi - 1), hi - 1)
        };
        match share.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(item as usize),
            Err(now) => cur = now,
        }
    }
}

/// Spins until `ready`, then yields between checks after [`SPINS_BEFORE_YIELD`].
fn wait_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Runs `f` with the current rayon pool's other threads as its team: until `f`
/// returns they wait for its regions spinning instead of going back to the pool. With
/// one thread, inside another team, or inside a region's item, just `f()`.
///
/// Only regions run through [`for_each_index`] and [`for_each_mut`] use the team;
/// rayon's own parallel iterators inside `f` still work, on the calling thread alone
/// (the helpers do not take rayon work while they spin).
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    let busy = TEAM.with(|t| !t.get().is_null()) || IN_REGION.with(Cell::get);
    if threads < 2 || busy {
        return f();
    }
    let shared = Shared::new(threads);
    let result = rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| shared.help());
        }
        let outer = TEAM.with(|t| t.replace(&raw const shared));
        let result = catch_unwind(AssertUnwindSafe(f));
        TEAM.with(|t| t.set(outer));
        shared.stop.store(true, Ordering::Release);
        result
    });
    match result {
        Ok(r) => r,
        Err(payload) => resume_unwind(payload),
    }
}

/// Whether regions started here run on a team (inside [`run`], not inside an item).
fn active() -> bool {
    TEAM.with(|t| !t.get().is_null()) && !IN_REGION.with(Cell::get)
}

/// Calls `f(i)` for every `i < n`, in parallel: on the team inside [`run`], in order
/// inside a region's item, otherwise on the current rayon pool.
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if IN_REGION.with(Cell::get) || n == 1 {
        (0..n).for_each(f);
        return;
    }
    let team = TEAM.with(Cell::get);
    // A share's bounds are 32-bit: more items than that split on rayon.
    if team.is_null() || u32::try_from(n).is_err() {
        (0..n).into_par_iter().for_each(&f);
        return;
    }
    // SAFETY: `TEAM` points to the `Shared` of the `run` on this thread's stack, set
    // for exactly as long as that `run`'s closure runs (it is this call's caller).
    let team = unsafe { &*team };
    team.region(&f, n);
}

/// Calls `f(item)` for every element of `items`, in parallel as [`for_each_index`].
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    if !active() {
        if IN_REGION.with(Cell::get) {
            items.iter_mut().for_each(f);
        } else {
            items.par_iter_mut().for_each(&f);
        }
        return;
    }
    let base = Items(items.as_mut_ptr());
    let n = items.len();
    for_each_index(n, |i| {
        let base = &base;
        // SAFETY: `i < n` and each index is taken once per region, so the `&mut`
        // items are disjoint; `items` is borrowed mutably for the whole region.
        let item = unsafe { &mut *base.0.add(i) };
        f(item);
    });
}

/// A slice's elements handed out one index at a time ([`for_each_mut`]).
struct Items<T>(*mut T);

// SAFETY: each element goes to one thread at a time (one index, taken once), and
// `T: Send` lets it move to that thread.
unsafe impl<T: Send> Sync for Items<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::pool;

    #[test]
    fn every_item_runs_once_in_every_region() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                let sums = run(|| {
                    (0..200)
                        .map(|r| {
                            let n = r % 37;
                            let mut hits = vec![0u32; n];
                            for_each_mut(&mut hits, |h| *h += 1);
                            let total = AtomicUsize::new(0);
                            for_each_index(n, |i| {
                                total.fetch_add(i + 1, Ordering::Relaxed);
                            });
                            assert!(hits.iter().all(|&h| h == 1), "region {r}: {hits:?}");
                            total.into_inner()
                        })
                        .collect::<Vec<_>>()
                });
                let expected: Vec<usize> = (0..200).map(|r| (r % 37) * (r % 37 + 1) / 2).collect();
                assert_eq!(sums, expected, "{threads} threads");
            });
        }
    }

    #[test]
    fn helpers_take_items_and_nested_regions_run_in_order() {
        pool(2).install(|| {
            let seen = run(|| {
                let threads = Mutex::new(std::collections::HashSet::new());
                for _ in 0..50 {
                    for_each_index(64, |_| {
                        if let Ok(mut t) = threads.lock() {
                            t.insert(std::thread::current().id());
                        }
                        // A nested region runs in order on this thread.
                        let order = Mutex::new(Vec::new());
                        for_each_index(4, |j| order.lock().unwrap().push(j));
                        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    });
                }
                threads.into_inner().unwrap().len()
            });
            assert_eq!(seen, 2, "both threads of the pool took items");
        });
    }

    #[test]
    fn a_panicking_item_reaches_the_caller_after_the_region() {
        pool(2).install(|| {
            let finished = AtomicUsize::new(0);
            let result = catch_unwind(AssertUnwindSafe(|| {
                run(|| {
                    for_each_index(16, |i| {
                        if i == 5 {
                            panic!("item five");
                        }
                        finished.fetch_add(1, Ordering::Relaxed);
                    })
                })
            }));
            assert!(result.is_err());
            assert_eq!(finished.load(Ordering::Relaxed), 15, "the other items ran");
            // The pool still works after it.
            let n = run(|| {
                let c = AtomicUsize::new(0);
                for_each_index(10, |_| {
                    c.fetch_add(1, Ordering::Relaxed);
                });
                c.into_inner()
            });
            assert_eq!(n, 10);
        });
    }
}
