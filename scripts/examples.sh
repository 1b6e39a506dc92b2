#!/usr/bin/env bash
# Runs every example of the workspace (`cargo run --example NAME`), the way the
# README lists them, then each whole-model bench once; fails on the first failure.
# Fetches the test model when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f "${AFO_MODEL_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  scripts/fetch-models.sh
fi
cargo build --quiet -p afo-examples --examples
run() { printf '\n==> cargo run --example %s\n' "$*"; cargo run --quiet --example "$@"; }
run generate
printf 'Hi! My name is Ana.\nWhat is my name?\n' | run chat
run chain
run query
run quantize
run embed_server
run custom_router
run ssot_summary
# Each whole-model bench once, in criterion's test mode (no timing): the benches
# build and their inputs work. `cargo bench -p afo-benches` measures.
printf '\n==> cargo test --benches -p afo-benches (each bench once)\n'
cargo test --quiet -p afo-benches --benches
