//! Measuring the peak memory of one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ledger::Ledger;
use crate::probe::process_rss;

/// How often the sampling fallback reads the RSS.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);

/// Measures the process's peak resident memory over a span of work (one run).
///
/// A thread samples `VmRSS` every [`SAMPLE_INTERVAL`] and keeps the maximum, which
/// can miss a spike shorter than the interval; each sample also goes to the
/// [`Ledger`] given to [`PeakTracker::start`] ([`Ledger::observe_rss`]), so its
/// unaccounted memory stays current while runs go on. Nothing process-wide is reset
/// (the kernel's own high-water mark is left alone, for the embedding program), so
/// concurrent trackers never disturb each other.
///
/// When runs overlap, each run's figure is the process's peak during its span: it
/// includes the other runs' memory, which is what the cutline is about, and is an
/// upper bound on the run's own share. The ledger's reservations say what each run
/// itself holds.
#[derive(Debug)]
pub struct PeakTracker {
    sampler: Option<(Arc<AtomicBool>, Arc<AtomicU64>, JoinHandle<()>)>,
    start_rss: u64,
}

impl PeakTracker {
    /// Starts measuring; samples also feed `ledger`, when given.
    pub fn start(ledger: Option<Ledger>) -> Self {
        let start_rss = process_rss().map_or(0, |(rss, _)| rss);
        if let Some(l) = &ledger {
            l.observe_rss(start_rss);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(start_rss));
        let (s, m) = (Arc::clone(&stop), Arc::clone(&max));
        let sampler = std::thread::Builder::new()
            .name("afo-peak".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Ok((rss, _)) = process_rss() {
                        m.fetch_max(rss, Ordering::Relaxed);
                        if let Some(l) = &ledger {
                            l.observe_rss(rss);
                        }
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })
            .ok()
            .map(|handle| (stop, max, handle));
        Self { sampler, start_rss }
    }

    /// The resident bytes when measuring started.
    pub fn start_rss(&self) -> u64 {
        self.start_rss
    }

    /// Stops measuring and returns the peak resident bytes of the span (never less than
    /// the resident bytes now).
    pub fn finish(mut self) -> u64 {
        let rss = process_rss().map_or(0, |(rss, _)| rss);
        match self.sampler.take() {
            None => rss.max(self.start_rss),
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
        let tracker = PeakTracker::start(None);
        let before = tracker.start_rss();
        {
            // Through `black_box`: an optimising build may elide a buffer whose one
            // read it can predict.
            let v = std::hint::black_box(vec![1u8; 64 << 20]);
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
