#!/usr/bin/env bash
# The main job: fetches SmolLM2-135M-Instruct when it is missing, builds afo in release
# mode, and generates text with it. Extra arguments replace the default prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo build --release --quiet -p afo-cli
model=${AFO_MODEL_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "$#" -eq 0 ]; then
  set -- "Write a haiku about Rust"
fi
exec target/release/afo generate --model "$model" "$@"
