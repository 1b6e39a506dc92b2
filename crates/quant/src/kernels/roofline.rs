//! The memory-bandwidth roofline a decode step is held against.
//!
//! One decode step reads every weight matrix it multiplies once (and the KV cache), so
//! no kernel can run a step faster than those bytes take to arrive from memory.
//! [`measure_read_bandwidth`] measures what this machine's memory delivers to the
//! current rayon pool, the way a decode step reads: long sequential reads, every thread
//! on its own part.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

/// Bytes a task reads in one piece.
const CHUNK_BYTES: usize = 1 << 20;

/// Read bandwidth of main memory in bytes per second: the best of `passes` reads of a
/// `bytes`-long buffer (rounded up to whole MiB; choose it well above the last-level
/// cache, 256 MiB for example), split across the current rayon pool.
///
/// The buffer is allocated and written once before the timed passes and freed on
/// return. Returns 0.0 for a zero size or no passes.
pub fn measure_read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let words = bytes.div_ceil(CHUNK_BYTES) * CHUNK_BYTES / 8;
    if words == 0 || passes == 0 {
        return 0.0;
    }
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..passes {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(CHUNK_BYTES / 8)
            .map(|c| {
                // Eight independent sums, so the loads are not serialised by one chain.
                let mut acc = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for (a, v) in acc.iter_mut().zip(w) {
                        *a = a.wrapping_add(*v);
                    }
                }
                acc.iter().fold(0u64, |s, v| s.wrapping_add(*v))
            })
            .reduce(|| 0, u64::wrapping_add);
        black_box(sum);
        let secs = t.elapsed().as_secs_f64();
        if secs > 0.0 {
            best = best.max((words * 8) as f64 / secs);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_positive_and_finite_and_empty_reads_are_zero() {
        let bw = measure_read_bandwidth(8 << 20, 2);
        // A machine reads at least 10 MB/s and at most 10 TB/s.
        assert!(bw.is_finite() && (1e7..1e13).contains(&bw), "{bw}");
        assert_eq!(measure_read_bandwidth(0, 3), 0.0);
        assert_eq!(measure_read_bandwidth(1 << 20, 0), 0.0);
    }
}
