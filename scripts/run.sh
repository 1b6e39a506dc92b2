#!/usr/bin/env bash
# The main job: fetches SmolLM2-135M-Instruct when it is missing, builds afo in release
# mode, generates text with it, then runs the image-analysis -> summary chain on the
# shipped sample image (the tiny test VLM describes it, SmolLM2 summarises).
# Extra arguments replace the default prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo build --release --quiet -p afo-cli
model=${AFO_MODEL_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "$#" -eq 0 ]; then
  set -- "Write a haiku about Rust"
fi
target/release/afo generate --model "$model" "$@"
echo
exec target/release/afo chain --llm "$model" --analysis-tokens 48 --summary-tokens 64
