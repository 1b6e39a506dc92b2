//! Shared by the runtime's tests: where the real test model is.

use std::path::PathBuf;

use afo_runtime::engine::{GenerateOptions, SamplingParams};
use afo_runtime::{GenerateRequest, Prompt};

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

/// "The capital of France is" on SmolLM2, greedy, up to `max_tokens` tokens.
#[allow(dead_code)] // not every test binary asks for it
pub(crate) fn capital_request(max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(smollm2(), Prompt::Text("The capital of France is".into())).with_options(
        GenerateOptions {
            max_tokens,
            sampling: SamplingParams::greedy(),
            ..GenerateOptions::default()
        },
    )
}
