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
//! - [`Ledger`]: the one account of the runtime's memory. Model weights (before the
//!   load), each sequence's KV cache, workspace, images and prefix-cache blocks are
//!   reserved there ([`MemoryKind`]) through RAII [`Reservation`]s; [`Ledger::admit`]
//!   reserves the first of a run's plans (the one asked for, then cheaper ones) that
//!   fits under the cutline less a margin, or refuses with the numbers ([`Refusal`]).
//!   The resident memory the ledger does not explain ("unaccounted") widens the
//!   margin ([`Ledger::observe_rss`]).
//! - [`release_free_memory`] gives the allocator's free memory back to the system, so
//!   a process that was busy returns to its steady state.

//! # Example
//!
//! ```
//! use afo_guard::{Admission, Estimator, KindBytes, Ledger, MemoryBudget, MemoryKind,
//!                 ModelShape, PlanOption, RunOutput, RunPlan, Weights, badge, StatusBadge,
//!                 AttentionMemory};
//!
//! let budget = MemoryBudget::builder().cutline("2GiB".parse::<afo_guard::ByteSize>()?).build()?;
//! let ledger = Ledger::new(budget.cutline());
//! // The weights are reserved before the model loads, and held while it stays loaded.
//! let weights = ledger.try_reserve(MemoryKind::Weights, 98_000_000).expect("fits");
//! let estimator = Estimator::default();
//! let plan = RunPlan {
//!     weights: Weights::Bytes(98_000_000),
//!     shape: ModelShape { layers: 30, hidden: 576, intermediate: 1536, heads: 9,
//!                         kv_heads: 3, head_dim: 64, vocab: 49152 },
//!     prompt_tokens: 64, max_new_tokens: 256, batch: 1,
//!     kv_bytes_per_token: 30 * 2 * 3 * 64 * 4,
//!     prefill_chunk: 512, image_pixels: vec![], vision_tokens: 0,
//!     output: RunOutput::Logits, attention: AttentionMemory::Fused,
//! };
//! let estimate = estimator.estimate(&plan);
//! let run = PlanOption::new("as asked", estimator.run_parts(&estimate));
//! match ledger.admit(&[run]) {
//!     Admission::Admit { index, predicted_peak, reservation } => {
//!         assert_eq!(index, 0);
//!         assert!(predicted_peak <= budget.cutline());
//!         assert_eq!(ledger.reserved(), weights.bytes() + reservation.bytes());
//!         drop(reservation); // the run is over
//!         assert_eq!(ledger.reserved(), weights.bytes());
//!     }
//!     Admission::Refuse(why) => panic!("a 135M model fits in 2 GiB: {why}"),
//! }
//! assert_eq!(badge(estimate.total, &budget), StatusBadge::Safe);
//! # Ok::<(), afo_guard::Error>(())
//! ```
//!
//! # Features
//!
//! None. The probes read Linux's `/proc` and cgroup files and fall back to `sysinfo`
//! elsewhere. The only `unsafe` calls are glibc's `malloc_trim` and `mallopt`, in `trim.rs`.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![deny(unsafe_code)]

mod budget;
mod bytesize;
mod cgroup;
mod error;
mod estimator;
mod health;
mod ledger;
mod peak;
mod probe;
mod trim;

pub use afo_ssot::StatusBadge;
pub use budget::{
    DEFAULT_ACCELERATOR_FRACTION, DEFAULT_CUTLINE, DEFAULT_WARN_FRACTION, MIN_CGROUP_RESERVE,
    MemoryBudget, MemoryBudgetBuilder,
};
pub use bytesize::ByteSize;
pub use cgroup::{CgroupMemory, CgroupProbe, CgroupVersion};
pub use error::{Error, Result};
pub use estimator::{
    AttentionMemory, Estimate, Estimator, KvFormat, ModelShape, RunOutput, RunPlan, Weights,
    kv_bytes_per_token,
};
pub use health::{ERROR_PENALTY, FALLBACK_PENALTY, HealthInputs, badge, health_score};
pub use ledger::{
    Admission, KindBytes, Ledger, LedgerSnapshot, MemoryKind, PlanOption, Refusal, Reservation,
    default_min_margin,
};
pub use peak::{PeakTracker, SAMPLE_INTERVAL};
pub use probe::{FixedProbe, MemorySnapshot, Probe, SystemProbe, parse_proc_status, process_rss};
pub use trim::{
    MAX_KEPT_BYTES, MMAP_THRESHOLD, allocator_thresholds, kept_workspace, release_free_memory,
    return_large_blocks, reuse_workspace,
};
