//! Present only so that the build-dependencies above take part in feature
//! unification for proc-macros and build scripts; it does nothing.
fn main() {}
