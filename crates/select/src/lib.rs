//! Model selection for afo.
//!
//! `afo-select` will own the model catalog and its cards (quality "trinity" score,
//! size, capabilities), the analysis of a query's complexity, the policy that picks the
//! cheapest model meeting the quality a query needs, the fallback ladder under memory
//! pressure, and the adaptive token budget and temperature policy.
//!
//! Status: planned. The crate exposes no items yet; each arrives when it works.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]
