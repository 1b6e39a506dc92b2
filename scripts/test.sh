#!/usr/bin/env bash
# The test command: fetches the real test model when it is missing, then runs every
# test of the workspace (unit, integration, doc tests), including the ones over the
# real model.
#
# With cargo-nextest installed (it is on the CI image) each test runs in its own
# process, two at a time (.config/nextest.toml), then the doc tests run with
# `cargo test --doc` (nextest does not run them); without it, `cargo test --workspace`
# runs all three kinds. Arguments go to the test runner (a filter, for example).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
if cargo nextest --version >/dev/null 2>&1 && [[ "${AFO_NO_NEXTEST:-}" != 1 ]]; then
  cargo nextest run --workspace "$@"
  cargo test --workspace --doc
else
  cargo test --workspace "$@"
fi
