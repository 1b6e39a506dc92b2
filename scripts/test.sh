#!/usr/bin/env bash
# The test command: fetches the real test model when it is missing, then runs every
# test of the workspace (unit, integration, doc tests), including the ones over the
# real model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo test --workspace "$@"
