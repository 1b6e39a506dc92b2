//! The health badge shown for a run and for the whole process.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How close a run (or the process) came to the memory cutline.
///
/// The order of the variants is the order of severity: `Safe < Warn < OverCutline`,
/// so the worst badge of a set is its maximum.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum StatusBadge {
    /// Peak memory stayed below the warn fraction of the cutline.
    #[serde(rename = "SAFE")]
    Safe,
    /// Peak memory reached the warn fraction but stayed at or under the cutline.
    #[serde(rename = "WARN")]
    Warn,
    /// Peak memory went past the cutline.
    #[serde(rename = "OVER_CUTLINE")]
    OverCutline,
}

impl StatusBadge {
    /// The wire name of the badge (`SAFE`, `WARN` or `OVER_CUTLINE`).
    pub const fn as_str(self) -> &'static str {
        match self {
            StatusBadge::Safe => "SAFE",
            StatusBadge::Warn => "WARN",
            StatusBadge::OverCutline => "OVER_CUTLINE",
        }
    }
}

impl fmt::Display for StatusBadge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned when a string names no badge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status badge `{0}` (expected SAFE, WARN or OVER_CUTLINE)")]
pub struct ParseBadgeError(pub String);

impl FromStr for StatusBadge {
    type Err = ParseBadgeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "SAFE" => Ok(StatusBadge::Safe),
            "WARN" => Ok(StatusBadge::Warn),
            "OVER_CUTLINE" => Ok(StatusBadge::OverCutline),
            _ => Err(ParseBadgeError(s.to_owned())),
        }
    }
}
