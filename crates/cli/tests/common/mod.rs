//! What the CLI's integration tests share.

use std::path::PathBuf;

/// The real test model; fails the test (never skips it) when missing.
pub(crate) fn smollm2() -> PathBuf {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set AFO_MODEL_DIR)",
        path.display()
    );
    path
}
