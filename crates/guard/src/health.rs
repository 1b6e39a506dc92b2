//! The status badge and the health score.

use afo_ssot::StatusBadge;

use crate::budget::MemoryBudget;

/// The badge for a peak (measured or predicted) against a budget: `SAFE` below
/// `warn_fraction x cutline`, `WARN` from there up to and including the cutline,
/// `OVER_CUTLINE` above it. Monotonic: a larger peak never gets a better badge.
pub fn badge(peak_bytes: u64, budget: &MemoryBudget) -> StatusBadge {
    if peak_bytes > budget.cutline() {
        StatusBadge::OverCutline
    } else if peak_bytes >= budget.warn_bytes() {
        StatusBadge::Warn
    } else {
        StatusBadge::Safe
    }
}

/// What the health score is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthInputs {
    /// The peak, in bytes.
    pub peak_bytes: u64,
    /// The cutline, in bytes.
    pub cutline_bytes: u64,
    /// Whether the run failed.
    pub error: bool,
    /// Whether a fallback (a smaller or more quantized model) was taken.
    pub fallback: bool,
}

/// Points lost when the run failed.
pub const ERROR_PENALTY: f64 = 40.0;
/// Points lost when a fallback was taken.
pub const FALLBACK_PENALTY: f64 = 10.0;

/// The health score, 0 to 100.
///
/// `headroom = 1 - peak / cutline`. The memory part is `100 x min(1, headroom / 0.5)`:
/// full marks with half the cutline free, falling linearly to 0 at the cutline, and 0
/// past it. Then [`ERROR_PENALTY`] is taken off for a failed run and
/// [`FALLBACK_PENALTY`] for a fallback, and the result is clamped to 0..=100. The score
/// never rises when the peak grows.
pub fn health_score(inputs: HealthInputs) -> f64 {
    let memory = if inputs.cutline_bytes == 0 {
        0.0
    } else {
        let headroom = 1.0 - inputs.peak_bytes as f64 / inputs.cutline_bytes as f64;
        100.0 * (headroom / 0.5).clamp(0.0, 1.0)
    };
    let mut score = memory;
    if inputs.error {
        score -= ERROR_PENALTY;
    }
    if inputs.fallback {
        score -= FALLBACK_PENALTY;
    }
    score.clamp(0.0, 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badge_thresholds() {
        let b = MemoryBudget::builder().cutline(1000u64).build().unwrap();
        assert_eq!(badge(0, &b), StatusBadge::Safe);
        assert_eq!(badge(899, &b), StatusBadge::Safe);
        assert_eq!(badge(900, &b), StatusBadge::Warn);
        assert_eq!(badge(1000, &b), StatusBadge::Warn);
        assert_eq!(badge(1001, &b), StatusBadge::OverCutline);
    }

    #[test]
    fn health_formula() {
        let h = |peak, error, fallback| {
            health_score(HealthInputs {
                peak_bytes: peak,
                cutline_bytes: 1000,
                error,
                fallback,
            })
        };
        assert_eq!(h(0, false, false), 100.0);
        assert_eq!(h(500, false, false), 100.0);
        assert_eq!(h(750, false, false), 50.0);
        assert_eq!(h(1000, false, false), 0.0);
        assert_eq!(h(2000, false, false), 0.0);
        assert_eq!(h(0, true, false), 60.0);
        assert_eq!(h(0, false, true), 90.0);
        assert_eq!(h(0, true, true), 50.0);
        assert_eq!(h(1000, true, true), 0.0);
    }
}
