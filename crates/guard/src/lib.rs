//! Memory guarding for afo: nothing runs past the cutline.
//!
//! The guard predicts a run's peak memory before it starts, admits, degrades or
//! refuses it, holds its bytes while it runs, measures the real peak afterwards, and
//! turns the peak into a badge and a health score.
//!
//! - [`MemoryBudget`]: the cutline (default 20 GiB, written as `20GiB`, `20GB` or bytes
//!   through [`ByteSize`]), the warn fraction (0.9) and the accelerator fraction (0.8);
//!   [`MemoryBudget::effective_cutline`] lowers the cutline to a container's cgroup
//!   limit less a reserve.
//! - Probes: [`SystemProbe`] takes a [`MemorySnapshot`] (RSS, peak RSS, the system's
//!   available memory, the cgroup limit through [`CgroupProbe`]); [`PeakTracker`]
//!   measures the peak of one span of work.
//! - [`Estimator`] predicts a run's peak from a [`RunPlan`], with a breakdown
//!   ([`Estimate`]): weights, KV cache, activations, logits, images, overhead.
//! - [`badge`] and [`health_score`] turn a peak into a `SAFE`/`WARN`/`OVER_CUTLINE`
//!   [`StatusBadge`] and a 0-100 score, with documented formulas.
//! - [`Guard::admit`] answers [`Admission::Admit`] with an RAII [`Reservation`],
//!   [`Admission::Degrade`] naming a cheaper plan, or [`Admission::Refuse`] with the
//!   numbers, so that concurrent runs cannot together pass the cutline.
//!
//! # Example
//!
//! ```
//! use afo_guard::{Admission, Estimator, Guard, MemoryBudget, ModelShape, RunPlan, Weights,
//!                 badge, StatusBadge};
//!
//! let budget = MemoryBudget::builder().cutline("2GiB".parse::<afo_guard::ByteSize>()?).build()?;
//! let plan = RunPlan {
//!     weights: Weights::Bytes(98_000_000),
//!     shape: ModelShape { layers: 30, hidden: 576, intermediate: 1536, heads: 9,
//!                         kv_heads: 3, head_dim: 64, vocab: 49152 },
//!     prompt_tokens: 64, max_new_tokens: 256, batch: 1, kv_dtype_bytes: 4,
//!     prefill_chunk: 512, image_pixels: vec![], vision_tokens: 0,
//! };
//! let estimate = Estimator::default().estimate(&plan);
//! let guard = Guard::new(budget.cutline());
//! match guard.admit(estimate.total, 0, &[]) {
//!     Admission::Admit(reservation) => {
//!         assert_eq!(guard.reserved(), estimate.total);
//!         drop(reservation); // the run is over
//!         assert_eq!(guard.reserved(), 0);
//!     }
//!     other => panic!("a 135M model fits in 2 GiB: {other:?}"),
//! }
//! assert_eq!(badge(estimate.total, &budget), StatusBadge::Safe);
//! # Ok::<(), afo_guard::Error>(())
//! ```
//!
//! # Features
//!
//! None. The probes read Linux's `/proc` and cgroup files and fall back to `sysinfo`
//! elsewhere.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod admission;
mod budget;
mod bytesize;
mod cgroup;
mod error;
mod estimator;
mod health;
mod peak;
mod probe;

pub use admission::{Admission, Guard, PlanOption, Refusal, Reservation};
pub use afo_ssot::StatusBadge;
pub use budget::{
    DEFAULT_ACCELERATOR_FRACTION, DEFAULT_CUTLINE, DEFAULT_WARN_FRACTION, MIN_CGROUP_RESERVE,
    MemoryBudget, MemoryBudgetBuilder,
};
pub use bytesize::ByteSize;
pub use cgroup::{CgroupMemory, CgroupProbe, CgroupVersion};
pub use error::{Error, Result};
pub use estimator::{Estimate, Estimator, ModelShape, RunPlan, Weights};
pub use health::{ERROR_PENALTY, FALLBACK_PENALTY, HealthInputs, badge, health_score};
pub use peak::{PeakTracker, SAMPLE_INTERVAL};
pub use probe::{FixedProbe, MemorySnapshot, Probe, SystemProbe, parse_proc_status, process_rss};
