//! Shared helpers of afo's examples: where the test model and the examples' SSOT log
//! are. The examples themselves are in this folder (`cargo run --example NAME`).

use std::path::PathBuf;

/// The workspace root (the examples resolve their files from it, whatever the
/// current directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// SmolLM2-135M-Instruct (GGUF Q4_1) in `$AFO_MODEL_DIR` or the workspace's `models/`.
///
/// # Errors
/// When the file is missing, naming where it was looked for and how to fetch it.
pub fn smollm2() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("AFO_MODEL_DIR")
        .map_or_else(|| workspace_root().join("models"), PathBuf::from);
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set AFO_MODEL_DIR)",
        path.display()
    );
    Ok(path)
}

/// The SSOT log every example appends its runs to: `logs/examples.jsonl` under the
/// workspace root (git-ignored). `cargo run --example ssot_summary` reads it.
pub fn examples_log() -> PathBuf {
    workspace_root().join("logs").join("examples.jsonl")
}
