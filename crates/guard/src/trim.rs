//! Giving freed memory back to the operating system.
//!
//! glibc's allocator keeps freed memory in its arenas (one per thread that allocated),
//! so a process that was busy stays at its high-water mark with nothing running: the
//! resident memory no longer says what the process holds, and a memory guard that
//! looks at it refuses work that would fit. [`release_free_memory`] asks the allocator
//! to return what it can (`malloc_trim(0)`, which since glibc 2.8 walks every arena and
//! releases free pages in the middle of the heaps too). The runtime calls it when a run
//! ends and when a model is dropped. [`return_large_blocks`] and [`reuse_workspace`]
//! set how much the allocator keeps while a model runs. Measured effect:
//! docs/benchmarks.md.

use std::sync::atomic::{AtomicU64, Ordering};

/// Returns the allocator's free memory to the operating system where the allocator
/// supports it (glibc on Linux); returns whether anything was released. Elsewhere a
/// no-op that returns `false`.
pub fn release_free_memory() -> bool {
    imp::release()
}

/// The smallest allocation size from which glibc serves blocks with their own memory
/// map (returned to the system when freed) instead of from its heaps: 1 MiB.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// The most freed memory a heap keeps at its top for reuse, however large the
/// workspace: 64 MiB.
pub const MAX_KEPT_BYTES: usize = 64 << 20;

/// The largest mmap threshold glibc accepts on 64-bit systems: 32 MiB.
const MAX_MMAP_THRESHOLD: usize = 32 << 20;

/// glibc's default trim threshold: 128 KiB.
const DEFAULT_TRIM_THRESHOLD: usize = 128 << 10;

/// The largest workspace asked for so far ([`reuse_workspace`]), process-wide.
static WORKSPACE: AtomicU64 = AtomicU64::new(0);

/// The allocator's two settings for a forward pass whose working set is `workspace`
/// bytes (one prefill chunk's activations, as the estimator counts them):
/// `(mmap_threshold, trim_threshold)`.
///
/// - Blocks from a third of the workspace up (at least [`MMAP_THRESHOLD`], at most
///   32 MiB) get their own memory map and go back to the system when freed: a KV
///   cache, a long prompt's scores. A layer's tensors are smaller (the largest, the
///   MLP's `chunk x intermediate`, is under a third of the working set) and come
///   from the heaps.
/// - A heap keeps up to `workspace` bytes (at most [`MAX_KEPT_BYTES`]) of freed memory
///   at its top instead of returning it after each free, so the next layer reuses
///   the pages the last one freed.
///
/// With no workspace known, `(MMAP_THRESHOLD, 128 KiB)`: glibc's trim default.
pub fn allocator_thresholds(workspace: u64) -> (usize, usize) {
    let workspace = usize::try_from(workspace).unwrap_or(usize::MAX);
    let mmap = (workspace / 3).clamp(MMAP_THRESHOLD, MAX_MMAP_THRESHOLD);
    let trim = workspace.clamp(DEFAULT_TRIM_THRESHOLD, MAX_KEPT_BYTES);
    (mmap, trim)
}

/// Makes large blocks come back to the system when freed: fixes glibc's mmap
/// threshold ([`allocator_thresholds`] of the largest workspace asked for so far, at
/// least [`MMAP_THRESHOLD`]). glibc otherwise raises the threshold each time a
/// mapped block is freed (up to 32 MiB) and its trim threshold with it (up to
/// 64 MiB), after which a model's activations and KV caches come from its heaps and
/// stay resident when freed: [`release_free_memory`] returns the free pages inside the
/// heaps, but not the free top of a heap other than the main thread's, which each
/// serving thread has. Measured on the server after one 1,500-token request: 84-109
/// MiB stayed resident beyond the ledger with nothing running; with the mmap threshold
/// fixed at 1 MiB, 5-7 MiB; with the thresholds of SmolLM2's workspace, 2.4 MiB.
/// Process-wide and idempotent. Returns whether the settings were applied (glibc on
/// Linux).
pub fn return_large_blocks() -> bool {
    imp::apply(allocator_thresholds(WORKSPACE.load(Ordering::Relaxed)))
}

/// Lets the allocator reuse a forward pass's freed tensors: a working set of
/// `workspace` bytes (one prefill chunk's activations of the model loaded) is kept
/// in the heaps between operations instead of being mapped and unmapped by each one
/// ([`allocator_thresholds`]; process-wide, the largest workspace asked for wins).
/// Every freed page of those heaps still goes back at the end of a run
/// ([`release_free_memory`]), except at most `workspace` bytes at the top of each
/// serving thread's heap. Measured on SmolLM2 (a 512-token chunk, 16 MiB of
/// activations): a prompt ran 1.25x faster (the page faults of mapping every layer's
/// tensors afresh were a fifth of its time), and the server's resident memory after a
/// burst stayed below what its ledger held (docs/benchmarks.md). Returns whether the
/// settings were applied (glibc on Linux; elsewhere `false`).
pub fn reuse_workspace(workspace: u64) -> bool {
    let before = WORKSPACE.fetch_max(workspace, Ordering::Relaxed);
    imp::apply(allocator_thresholds(before.max(workspace)))
}

/// The largest workspace asked for so far ([`reuse_workspace`]; 0 before any), whose
/// [`allocator_thresholds`] are in force.
pub fn kept_workspace() -> u64 {
    WORKSPACE.load(Ordering::Relaxed)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub(super) fn release() -> bool {
        // SAFETY: `malloc_trim` takes a plain integer, touches only the allocator's
        // own free lists under its own locks, and is safe to call from any thread at
        // any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }

    pub(super) fn apply((mmap, trim): (usize, usize)) -> bool {
        let mmap = i32::try_from(mmap).unwrap_or(i32::MAX);
        let trim = i32::try_from(trim).unwrap_or(i32::MAX);
        // SAFETY: `mallopt` takes two plain integers and changes a setting of the
        // allocator under its own lock; M_MMAP_THRESHOLD accepts any value up to
        // 32 MiB on 64-bit systems (`allocator_thresholds` stays below), and
        // M_TRIM_THRESHOLD any value.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn release() -> bool {
        false
    }

    pub(super) fn apply(_: (usize, usize)) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_the_workspace_within_glibc_bounds() {
        // Nothing known: glibc's defaults with the fixed 1 MiB mmap threshold.
        assert_eq!(allocator_thresholds(0), (MMAP_THRESHOLD, 128 << 10));
        // SmolLM2's 512-token chunk (about 16 MiB): its 3 MiB MLP tensors come from
        // the heap, and 16 MiB is kept at a heap's top.
        let chunk = 16_130_000;
        assert_eq!(
            allocator_thresholds(chunk),
            (chunk as usize / 3, chunk as usize)
        );
        assert!(allocator_thresholds(chunk).0 > 512 * 1536 * 4);
        // A small model: never below the 1 MiB floor.
        assert_eq!(allocator_thresholds(2 << 20), (MMAP_THRESHOLD, 2 << 20));
        // A huge workspace: glibc's 32 MiB mmap ceiling and the 64 MiB cap.
        assert_eq!(
            allocator_thresholds(u64::MAX),
            (MAX_MMAP_THRESHOLD, MAX_KEPT_BYTES)
        );
    }

    /// This thread's minor page faults so far (`/proc/thread-self/stat`, field 10).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thread_minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        // Fields after the command name in parentheses: state is field 3, minflt 10.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after
            .split_whitespace()
            .nth(7)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0)
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_reused_workspace_is_not_faulted_in_again() {
        // A layer's 3 MiB tensor, allocated, written and freed again and again on one
        // thread, as a forward pass does layer after layer.
        let churn = || {
            let before = thread_minor_faults();
            for i in 0..64u8 {
                let block = vec![i | 1; 3 << 20];
                std::hint::black_box(&block);
            }
            thread_minor_faults() - before
        };
        assert!(return_large_blocks());
        let mapped = churn();
        assert!(reuse_workspace(24 << 20));
        let reused = churn();
        // Mapped afresh, every block faults its pages in (768 of 4 KiB); kept in the
        // heap, only the first does.
        assert!(
            mapped >= 64 * 256,
            "{mapped} faults with every block mapped"
        );
        assert!(
            reused * 8 < mapped,
            "{reused} faults with the workspace kept, {mapped} without"
        );
        // A later runtime's fixed thresholds keep the largest workspace asked for.
        assert!(return_large_blocks());
        assert_eq!(kept_workspace(), 24 << 20);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_comes_back() {
        use crate::probe::process_rss;
        // Many mid-sized blocks from the heap (below the mmap threshold), touched,
        // then freed: glibc keeps them until trimmed.
        let rss = || process_rss().map(|(r, _)| r).unwrap_or(0);
        let before = rss();
        let mut blocks: Vec<Vec<u8>> = (0..2048).map(|i| vec![i as u8; 60 << 10]).collect();
        let keep = blocks.pop();
        let full = rss();
        drop(blocks);
        release_free_memory();
        let after = rss();
        assert!(keep.is_some());
        // The resident size is the process's, and other tests run beside this one:
        // half of the 120 MiB is asked for, not all of it.
        let blocks: u64 = 2047 * (60 << 10);
        assert!(
            full > before + blocks / 2,
            "the blocks took {} bytes",
            full.saturating_sub(before)
        );
        assert!(
            after < full - blocks / 2,
            "after trimming {after} bytes resident, {full} with the blocks"
        );
    }
}
