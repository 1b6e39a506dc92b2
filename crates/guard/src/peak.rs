//! Measuring the peak memory of one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::probe::process_rss;

/// How often the sampling fallback reads the RSS.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);

/// Measures this process's peak resident memory over a span of work.
///
/// On Linux, [`PeakTracker::start`] resets the kernel's high-water mark (`VmHWM`) by
/// writing `5` to `/proc/self/clear_refs`, and [`PeakTracker::finish`] reads it back:
/// the exact peak of the span, with no sampling. Where the reset is not permitted, a
/// thread samples `VmRSS` every [`SAMPLE_INTERVAL`] and keeps the maximum, which can
/// miss a spike shorter than the interval. [`PeakTracker::exact`] says which was used.
/// The peak is process-wide: concurrent runs see each other's memory.
#[derive(Debug)]
pub struct PeakTracker {
    exact: bool,
    sampler: Option<(Arc<AtomicBool>, Arc<AtomicU64>, JoinHandle<()>)>,
    start_rss: u64,
}

impl PeakTracker {
    /// Starts measuring.
    pub fn start() -> Self {
        let exact = std::fs::write("/proc/self/clear_refs", b"5").is_ok();
        let start_rss = process_rss().map_or(0, |(rss, _)| rss);
        let sampler = (!exact).then(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let max = Arc::new(AtomicU64::new(start_rss));
            let (s, m) = (Arc::clone(&stop), Arc::clone(&max));
            let handle = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Ok((rss, _)) = process_rss() {
                        m.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            });
            (stop, max, handle)
        });
        Self {
            exact,
            sampler,
            start_rss,
        }
    }

    /// Whether the kernel's high-water mark was reset, making the peak exact.
    pub fn exact(&self) -> bool {
        self.exact
    }

    /// The resident bytes when measuring started.
    pub fn start_rss(&self) -> u64 {
        self.start_rss
    }

    /// Stops measuring and returns the peak resident bytes of the span (never less than
    /// the resident bytes now).
    pub fn finish(mut self) -> u64 {
        let (rss, hwm) = process_rss().unwrap_or((0, 0));
        match self.sampler.take() {
            None => hwm.max(rss),
            Some((stop, max, handle)) => {
                stop.store(true, Ordering::Relaxed);
                let _ = handle.join();
                max.load(Ordering::Relaxed).max(rss)
            }
        }
    }
}

impl Drop for PeakTracker {
    fn drop(&mut self) {
        if let Some((stop, _, handle)) = self.sampler.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_short_allocation() {
        let tracker = PeakTracker::start();
        let before = tracker.start_rss();
        {
            let v = vec![1u8; 64 << 20];
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(v[12345], 1);
        }
        let peak = tracker.finish();
        assert!(
            peak >= before + (48 << 20),
            "peak {peak} should include the 64 MiB buffer (start {before})"
        );
    }
}
