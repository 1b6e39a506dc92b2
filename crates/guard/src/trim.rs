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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub(super) fn release() -> bool {
        // SAFETY: `malloc_trim` takes a plain integer, touches only the allocator's
        // own free lists under its own locks, and is safe to call from any thread at
        // any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn release() -> bool {
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
        assert!(
            full > before + (100 << 20),
            "the blocks took {} bytes",
            full - before
        );
        assert!(
            after < full - (80 << 20),
            "after trimming {after} bytes resident, {full} with the blocks"
        );
    }
}
