//! Memory guarding for afo.
//!
//! (crate docs to be written)

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]
