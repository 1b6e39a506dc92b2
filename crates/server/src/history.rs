//! The recent health of the server, for `GET /api/history` and the dashboard's
//! charts: a ring of samples (by default one a second for the last ten minutes) of
//! resident and reserved memory, the cutline and warn line, the badge, and each
//! served model's waiting and running requests.
//!
//! The ring has a fixed capacity and the number of models is fixed when the server
//! is built, so its memory is bounded: per sample a 96-byte [`Sample`] and its two
//! small per-model vectors (4 bytes a model each, in allocations of at least 32
//! bytes), about 94 KiB for one model at the default 600 samples and under 5 KiB
//! more per further model. It is not reserved in the runtime's ledger: the server's
//! other fixed structures (the recent runs, the metrics) are not either.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use afo_runtime::guard::StatusBadge;
use serde::Serialize;

/// How many samples the ring keeps by default (ten minutes at one a second).
pub(crate) const DEFAULT_SAMPLES: usize = 600;
/// How often a sample is taken by default.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The server's health at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// The process's resident memory, in bytes.
    pub resident_bytes: u64,
    /// Bytes reserved in the runtime's ledger, all kinds.
    pub reserved_bytes: u64,
    /// The cutline, in bytes.
    pub cutline_bytes: u64,
    /// The warn threshold, in bytes.
    pub warn_bytes: u64,
    /// The badge of the resident memory.
    pub badge: StatusBadge,
    /// Requests waiting in each served model's queue, in the order of the models.
    pub waiting: Vec<u32>,
    /// Requests running on each served model, in the same order.
    pub running: Vec<u32>,
}

/// A ring of [`Sample`]s with a fixed capacity, taken at most once per interval.
#[derive(Debug)]
pub(crate) struct History {
    capacity: usize,
    interval: Duration,
    inner: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    samples: VecDeque<Sample>,
    last: Option<Instant>,
}

impl History {
    /// An empty ring of `capacity` samples (at least 1), one per `interval`.
    pub(crate) fn new(capacity: usize, interval: Duration) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            interval,
            inner: Mutex::new(Ring {
                samples: VecDeque::with_capacity(capacity),
                last: None,
            }),
        }
    }

    /// The most samples kept.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The time between two samples.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether a sample is due: none was taken yet, or the last is nearly an interval
    /// old (a tenth of it is forgiven, so that a ticker firing every interval is
    /// never skipped because the previous sample was taken a moment after its tick).
    pub(crate) fn due(&self, now: Instant) -> bool {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ring.last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval * 9 / 10)
    }

    /// Takes the sample `take` makes when one is due (see [`History::due`]), dropping
    /// the oldest when the ring is full. Returns whether it took one.
    pub(crate) fn sample_if_due(&self, take: impl FnOnce() -> Option<Sample>) -> bool {
        let now = Instant::now();
        if !self.due(now) {
            return false;
        }
        let Some(sample) = take() else {
            return false;
        };
        let mut ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Another caller may have taken one meanwhile.
        if ring
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval * 9 / 10)
        {
            return false;
        }
        ring.last = Some(now);
        if ring.samples.len() == self.capacity {
            ring.samples.pop_front();
        }
        ring.samples.push_back(sample);
        true
    }

    /// The samples taken after `since_ms` (milliseconds since the Unix epoch; all of
    /// them for `None`), oldest first.
    pub(crate) fn since(&self, since_ms: Option<u64>) -> Vec<Sample> {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match since_ms {
            None => ring.samples.iter().cloned().collect(),
            Some(t) => ring
                .samples
                .iter()
                .filter(|s| s.t_ms > t)
                .cloned()
                .collect(),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_ms: u64) -> Sample {
        Sample {
            t_ms,
            resident_bytes: 1,
            reserved_bytes: 2,
            cutline_bytes: 3,
            warn_bytes: 2,
            badge: StatusBadge::Safe,
            waiting: vec![0],
            running: vec![1],
        }
    }

    #[test]
    fn a_sample_is_as_small_as_the_documented_bound() {
        assert!(std::mem::size_of::<Sample>() <= 96);
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_up_to_its_capacity() {
        let h = History::new(3, Duration::ZERO);
        for t in 0..10 {
            assert!(h.sample_if_due(|| Some(sample(t))));
        }
        let kept: Vec<u64> = h.since(None).iter().map(|s| s.t_ms).collect();
        assert_eq!(kept, vec![7, 8, 9]);
        let newer: Vec<u64> = h.since(Some(7)).iter().map(|s| s.t_ms).collect();
        assert_eq!(newer, vec![8, 9]);
    }

    #[test]
    fn a_sample_is_taken_at_most_once_per_interval() {
        let h = History::new(10, Duration::from_secs(3600));
        assert!(h.sample_if_due(|| Some(sample(1))));
        let mut asked = false;
        assert!(!h.sample_if_due(|| {
            asked = true;
            Some(sample(2))
        }));
        assert!(!asked, "the probe was read although no sample was due");
        assert_eq!(h.since(None).len(), 1);
    }

    #[test]
    fn a_failed_probe_takes_no_sample() {
        let h = History::new(10, Duration::ZERO);
        assert!(!h.sample_if_due(|| None));
        assert!(h.since(None).is_empty());
        assert!(h.sample_if_due(|| Some(sample(5))));
        assert_eq!(h.since(None).len(), 1);
    }
}
