//! Feature unification for the afo workspace (no code).
//!
//! The packages that are built on their own (`afo-cli`, `afo-python`, the examples
//! and benches) depend on this crate so that their dependencies are compiled with
//! the same features as in `cargo test --workspace`, and one build serves every
//! command. See `Cargo.toml` for the reasoning and `scripts/check-unified.sh` for
//! the check that keeps it true.
