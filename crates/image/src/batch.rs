//! Many images in parallel under a memory bound.

use std::sync::{Condvar, Mutex};

use rayon::prelude::*;

use crate::{DecodeLimits, Preprocessed, PreprocessorConfig, Result, decode, preprocess};

/// Options of [`preprocess_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchOptions {
    /// Bytes that images being decoded may hold at once: each image reserves its
    /// estimate ([`estimate_peak_bytes`]) before it starts and returns it when done;
    /// an image larger than the whole budget runs alone. Default 1 GiB.
    pub max_in_flight_bytes: u64,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_in_flight_bytes: 1 << 30,
        }
    }
}

impl BatchOptions {
    /// Sets [`max_in_flight_bytes`](Self::max_in_flight_bytes).
    pub fn with_max_in_flight_bytes(mut self, bytes: u64) -> Self {
        self.max_in_flight_bytes = bytes;
        self
    }
}

/// Upper estimate of the memory one image takes while it is preprocessed: the
/// full-size decoded buffer as its header declares it, the resized RGB8 copy, and the
/// f32 `pixel_values` in the configured layout.
pub fn estimate_peak_bytes(info: &decode::ImageInfo, config: &PreprocessorConfig) -> u64 {
    let resized = crate::resize::smart_resize(
        info.height as usize,
        info.width as usize,
        config.factor(),
        config.min_pixels,
        config.max_pixels,
    )
    .map(|(h, w)| (h * w) as u64)
    .unwrap_or_else(|_| info.pixels());
    let floats = resized * 3 * config.frames() as u64 * 4;
    info.decoded_bytes + resized * 3 + floats
}

/// A counting semaphore over bytes.
#[derive(Debug)]
struct Budget {
    cap: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, want: u64) -> u64 {
        let want = want.min(self.cap);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + want > self.cap {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += want;
        want
    }

    fn release(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// Preprocesses many images in parallel on the current rayon pool, keeping the
/// estimated memory of images in flight under [`BatchOptions::max_in_flight_bytes`].
/// Results come back in input order, each image's error on its own.
pub fn preprocess_batch<B: AsRef<[u8]> + Sync>(
    inputs: &[B],
    config: &PreprocessorConfig,
    limits: &DecodeLimits,
    options: &BatchOptions,
) -> Vec<Result<Preprocessed>> {
    let budget = Budget {
        cap: options.max_in_flight_bytes.max(1),
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    inputs
        .par_iter()
        .with_max_len(1)
        .map(|bytes| {
            let bytes = bytes.as_ref();
            let info = decode::probe(bytes, limits)?;
            let held = budget.acquire(estimate_peak_bytes(&info, config));
            let out = preprocess(bytes, config, limits);
            budget.release(held);
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_a_request_at_its_size() {
        let b = Budget {
            cap: 100,
            used: Mutex::new(0),
            freed: Condvar::new(),
        };
        assert_eq!(b.acquire(500), 100);
        b.release(100);
        assert_eq!(b.acquire(30), 30);
        assert_eq!(b.acquire(70), 70);
        b.release(100);
        assert_eq!(*b.used.lock().unwrap_or_else(|e| e.into_inner()), 0);
    }
}
