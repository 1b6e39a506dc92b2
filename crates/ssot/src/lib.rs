//! The afo SSOT ("single source of truth") monitoring schema.
//!
//! (crate docs to be written with the records)

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

mod badge;

pub use badge::{ParseBadgeError, StatusBadge};
