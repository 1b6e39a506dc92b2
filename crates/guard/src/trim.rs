//! Giving freed memory back to the operating system.
//!
//! glibc's allocator keeps freed memory in its arenas (one per thread that allocated),
//! so a process that was busy stays at its high-water mark with nothing running: the
//! resident memory no longer says what the process holds, and a memory guard that
//! looks at it refuses work that would fit. [`release_free_memory`] asks the allocator
//! to return what it can (`malloc_trim(0)`, which since glibc 2.8 walks every arena and
//! releases free pages in the middle of the heaps too). The runtime calls it when a run
//! ends and when a model is dropped. Measured effect: docs/benchmarks.md.

/// Returns the allocator's free memory to the operating system where the allocator
/// supports it (glibc on Linux); returns whether anything was released. Elsewhere a
/// no-op that returns `false`.
pub fn release_free_memory() -> bool {
    imp::release()
}

/// The allocation size from which glibc serves blocks with their own memory map
/// (returned to the system when freed) instead of from its heaps: 1 MiB.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Makes large blocks come back to the system when freed: fixes glibc's mmap
/// threshold at [`MMAP_THRESHOLD`]. glibc otherwise raises the threshold each time a
/// mapped block is freed (up to 32 MiB), after which a model's activations and KV
/// caches come from its heaps and stay resident when freed, fragmented so that
/// [`release_free_memory`] cannot return them: measured on the server after one
/// 1,500-token request, 84-109 MiB stayed resident with nothing running; with the fixed
/// threshold, 5-7 MiB. Process-wide and idempotent; blocks below 1 MiB (a decode
/// step's tensors) are untouched, so decoding does not pay for extra maps. Returns
/// whether the setting was applied (glibc on Linux).
pub fn return_large_blocks() -> bool {
    imp::fix_mmap_threshold()
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

    pub(super) fn fix_mmap_threshold() -> bool {
        let bytes = i32::try_from(super::MMAP_THRESHOLD).unwrap_or(i32::MAX);
        // SAFETY: `mallopt` takes two plain integers and changes a setting of the
        // allocator under its own lock; M_MMAP_THRESHOLD accepts any value up to
        // 32 MiB on 64-bit systems.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn release() -> bool {
        false
    }

    pub(super) fn fix_mmap_threshold() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
