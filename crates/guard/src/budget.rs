//! The memory budget: the cutline, the warn fraction, the accelerator fraction.

use crate::bytesize::ByteSize;
use crate::error::{Error, Result};

/// The default cutline: 20 GiB.
pub const DEFAULT_CUTLINE: ByteSize = ByteSize::gib(20);
/// The default warn fraction of the cutline: 0.9.
pub const DEFAULT_WARN_FRACTION: f64 = 0.9;
/// The default fraction of an accelerator's memory the runtime may use: 0.8.
pub const DEFAULT_ACCELERATOR_FRACTION: f64 = 0.8;
/// The smallest reserve kept below a cgroup limit: 32 MiB.
pub const MIN_CGROUP_RESERVE: u64 = 32 << 20;

/// How much memory the runtime may use.
///
/// The **cutline** is the hard ceiling: nothing is admitted whose predicted peak would
/// pass it. The **warn fraction** of the cutline is where the badge turns from `SAFE`
/// to `WARN`. The **accelerator fraction** is the share of a GPU's memory the runtime
/// may use. In a container the cgroup memory limit is the real ceiling: see
/// [`MemoryBudget::effective_cutline`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBudget {
    cutline: u64,
    warn_fraction: f64,
    accelerator_fraction: f64,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self {
            cutline: DEFAULT_CUTLINE.bytes(),
            warn_fraction: DEFAULT_WARN_FRACTION,
            accelerator_fraction: DEFAULT_ACCELERATOR_FRACTION,
        }
    }
}

impl MemoryBudget {
    /// A builder starting from the defaults.
    pub fn builder() -> MemoryBudgetBuilder {
        MemoryBudgetBuilder::default()
    }

    /// The configured cutline, in bytes.
    pub fn cutline(&self) -> u64 {
        self.cutline
    }

    /// The warn fraction, in (0, 1].
    pub fn warn_fraction(&self) -> f64 {
        self.warn_fraction
    }

    /// The accelerator fraction, in (0, 1].
    pub fn accelerator_fraction(&self) -> f64 {
        self.accelerator_fraction
    }

    /// The bytes at which the badge turns to `WARN`: `warn_fraction x cutline`.
    pub fn warn_bytes(&self) -> u64 {
        (self.cutline as f64 * self.warn_fraction) as u64
    }

    /// The cutline in force given a cgroup memory limit: the lower of the configured
    /// cutline and the limit less a reserve of 5% of the limit (at least
    /// [`MIN_CGROUP_RESERVE`]), so the kernel's OOM killer never fires before the
    /// guard does. With no limit, the configured cutline.
    pub fn effective_cutline(&self, cgroup_limit: Option<u64>) -> u64 {
        match cgroup_limit {
            Some(limit) => {
                let reserve = (limit / 20).max(MIN_CGROUP_RESERVE);
                self.cutline.min(limit.saturating_sub(reserve))
            }
            None => self.cutline,
        }
    }

    /// The same budget with another cutline (for example the effective one).
    pub fn with_cutline(mut self, cutline: u64) -> Self {
        self.cutline = cutline;
        self
    }

    /// The bytes the runtime may use on an accelerator with `device_total` bytes.
    pub fn accelerator_cutline(&self, device_total: u64) -> u64 {
        (device_total as f64 * self.accelerator_fraction) as u64
    }
}

/// Builds a [`MemoryBudget`].
#[derive(Debug, Clone, Default)]
pub struct MemoryBudgetBuilder {
    cutline: Option<u64>,
    warn_fraction: Option<f64>,
    accelerator_fraction: Option<f64>,
}

impl MemoryBudgetBuilder {
    /// The cutline in bytes. Default [`DEFAULT_CUTLINE`] (20 GiB).
    pub fn cutline(mut self, bytes: impl Into<ByteSize>) -> Self {
        self.cutline = Some(bytes.into().bytes());
        self
    }

    /// The warn fraction of the cutline. Default 0.9.
    pub fn warn_fraction(mut self, fraction: f64) -> Self {
        self.warn_fraction = Some(fraction);
        self
    }

    /// The fraction of accelerator memory the runtime may use. Default 0.8.
    pub fn accelerator_fraction(mut self, fraction: f64) -> Self {
        self.accelerator_fraction = Some(fraction);
        self
    }

    /// Checks the settings and builds the budget.
    ///
    /// # Errors
    /// [`Error::Budget`] for a zero cutline or a fraction outside (0, 1].
    pub fn build(self) -> Result<MemoryBudget> {
        let d = MemoryBudget::default();
        let cutline = self.cutline.unwrap_or(d.cutline);
        if cutline == 0 {
            return Err(Error::Budget {
                setting: "cutline",
                value: "0".into(),
                reason: "must be more than 0 bytes",
            });
        }
        let fraction = |setting, v: Option<f64>, default| {
            let v = v.unwrap_or(default);
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(v)
            } else {
                Err(Error::Budget {
                    setting,
                    value: v.to_string(),
                    reason: "must be within (0, 1]",
                })
            }
        };
        Ok(MemoryBudget {
            cutline,
            warn_fraction: fraction("warn_fraction", self.warn_fraction, d.warn_fraction)?,
            accelerator_fraction: fraction(
                "accelerator_fraction",
                self.accelerator_fraction,
                d.accelerator_fraction,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let b = MemoryBudget::builder().build().unwrap();
        assert_eq!(b.cutline(), 20 << 30);
        assert_eq!(b.warn_fraction(), 0.9);
        assert_eq!(b.accelerator_fraction(), 0.8);
        assert_eq!(b.accelerator_cutline(10_000), 8_000);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(MemoryBudget::builder().cutline(0u64).build().is_err());
        for f in [0.0, -0.1, 1.5, f64::NAN] {
            let err = MemoryBudget::builder()
                .warn_fraction(f)
                .build()
                .unwrap_err();
            assert!(err.to_string().contains("warn_fraction"), "{err}");
        }
    }

    #[test]
    fn the_cgroup_limit_lowers_the_cutline() {
        let b = MemoryBudget::builder()
            .cutline(ByteSize::gib(20))
            .build()
            .unwrap();
        assert_eq!(b.effective_cutline(None), 20 << 30);
        // 8 GiB limit: 5% reserve.
        assert_eq!(
            b.effective_cutline(Some(8 << 30)),
            (8 << 30) - (8u64 << 30) / 20
        );
        // Small limit: the minimum reserve applies.
        assert_eq!(
            b.effective_cutline(Some(256 << 20)),
            (256 << 20) - MIN_CGROUP_RESERVE
        );
        // A limit above the cutline changes nothing.
        assert_eq!(b.effective_cutline(Some(64 << 30)), 20 << 30);
    }
}
