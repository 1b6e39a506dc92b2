//! Shared helpers of the engine's integration tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

/// The SmolLM2 GGUF's file name.
pub(crate) const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The path of the real test model; fails the test (never skips it) when missing.
pub(crate) fn smollm2_path() -> PathBuf {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(SMOLLM2);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set AFO_MODEL_DIR)",
        path.display()
    );
    path
}

/// The real SmolLM2 tokenizer, built from the GGUF metadata.
pub(crate) fn smollm2_tokenizer() -> afo_engine::Tokenizer {
    let mut file = std::fs::File::open(smollm2_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    afo_engine::Tokenizer::from_gguf(&content).unwrap()
}
