//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or checking SSOT records.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A log file could not be opened, read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a valid record.
    #[error("line {line}: {reason}")]
    Malformed {
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A field holds a value outside its range.
    #[error("field `{field}` = {value}: {reason}")]
    OutOfRange {
        /// The field's name as it appears in the JSON.
        field: &'static str,
        /// The offending value, as text.
        value: String,
        /// The allowed range.
        reason: &'static str,
    },
    /// A record names a schema version this crate does not know.
    #[error("unknown schema_version {0} (this reader knows versions 1 and 2)")]
    UnknownVersion(u64),
    /// A timestamp is not RFC 3339 UTC.
    #[error("timestamp `{value}` is not RFC 3339 in UTC: {reason}")]
    Timestamp {
        /// The offending text.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The operating system accepted only part of a record line; the log may hold a
    /// torn line, which readers skip.
    #[error("`{path}`: short write ({written} of {len} bytes)")]
    ShortWrite {
        /// The log file.
        path: PathBuf,
        /// Bytes written.
        written: usize,
        /// Bytes in the line.
        len: usize,
    },
    /// A record could not be serialised.
    #[error("cannot serialise a record: {0}")]
    Serialize(#[source] serde_json::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
