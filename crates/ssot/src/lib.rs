//! The afo SSOT ("single source of truth") monitoring schema: one JSON line per run.
//!
//! Every run of the afo runtime appends one record to a JSONL log. This crate owns the
//! record types, their JSON Schema, the append-only writer, the streaming reader and
//! log summaries.
//!
//! - [`RecordV1`] is the schema existing monitoring reads; [`RecordV2`] is every v1
//!   field, same names and units, plus the runtime's metrics (cache, memory guard,
//!   selection, time to first token, per-stage timings). v2 only adds, so a v1
//!   consumer that ignores unknown fields reads v2 lines unchanged, and
//!   [`Record::into_v2`] upgrades v1 lines.
//! - [`JsonlWriter`] appends one record per line with a single `write` on an
//!   `O_APPEND` file, so concurrent writers never interleave; [`Durability`] adds
//!   `fdatasync`/`fsync` per line.
//! - [`LogReader`] streams records with their line numbers, skipping or failing on
//!   malformed lines as the caller chooses ([`ReadMode`]), and always skipping (and
//!   reporting) a torn last line.
//! - [`Summary`] condenses a log: count, error rate, latency percentiles, tokens/s,
//!   cache hit rate, worst [`StatusBadge`]. [`MergedSummary`] does the same over
//!   several logs (the replicas of a deployment), with a summary per log or replica.
//! - [`json_schema`] prints the JSON Schema committed under `docs/schema/`.
//!
//! # Example
//!
//! ```
//! use afo_ssot::{Durability, JsonlWriter, LogReader, ReadMode, Record, RecordV1, RecordV2,
//!                RunStatus, StatusBadge, Timestamp};
//!
//! # fn main() -> Result<(), afo_ssot::Error> {
//! let dir = std::env::temp_dir().join(format!("afo-ssot-doc-{}", std::process::id()));
//! let path = dir.join("runs.jsonl");
//! let writer = JsonlWriter::open(&path, Durability::OsBuffered)?;
//!
//! let mut record = RecordV2::new(RecordV1 {
//!     schema_version: 2,
//!     ts: Timestamp::now(),
//!     run_id: "run-1".into(),
//!     chain: "generate".into(),
//!     model_id: "SmolLM2-135M-Instruct".into(),
//!     status: RunStatus::Ok,
//!     error: None,
//!     latency_ms: 812.0,
//!     peak_memory_bytes: 310 << 20,
//!     cutline_bytes: 20 << 30,
//!     tokens_in: 12,
//!     tokens_out: 64,
//!     tokens_per_s: 95.5,
//! });
//! record.status_badge = Some(StatusBadge::Safe);
//! record.ttft_ms = Some(41.0);
//! writer.append(&Record::from(record.clone()))?;
//!
//! let entries = LogReader::open(&path, ReadMode::Strict)?.read_all()?;
//! assert_eq!(entries.len(), 1);
//! assert_eq!(entries[0].record, Record::from(record));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! None: the crate is plain serde, schemars and the standard library.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod badge;
mod error;
mod merged;
mod reader;
mod record;
mod schema;
mod summary;
mod writer;

pub use badge::{ParseBadgeError, StatusBadge};
pub use error::{Error, Result};
pub use merged::{MergedSummary, PartKind, PartSummary, SkippedLine};
pub use reader::{Entry, LogReader, ReadMode, Skipped};
pub use record::{
    AdmissionRecord, Record, RecordV1, RecordV2, RunStatus, SchemaVersion, Selection, Stage,
    Timestamp,
};
pub use schema::json_schema;
pub use summary::{Percentiles, Summary};
pub use writer::{Durability, JsonlWriter};
