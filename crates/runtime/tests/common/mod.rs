//! Shared by the runtime's tests: where the real test model is.

use std::path::PathBuf;

/// SmolLM2-135M-Instruct (GGUF Q4_1) under `AFO_MODEL_DIR` or `models/`; panics with
/// what to run when it is missing (a test never passes without its input).
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
