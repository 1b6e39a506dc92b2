#!/usr/bin/env bash
# Runs every `sh` block of docs/guide.md, in order, in one bash session, so the guide's
# commands stay true. `afo` is the debug build, put on PATH (the guide builds a
# release one; the commands are the same); the guide's files go to logs/ (git-ignored).
# Bounded: the whole guide gets 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p afo-cli -p afo-examples --examples
export PATH="${CARGO_TARGET_DIR:-$PWD/target}/debug:$PATH"
mkdir -p logs
rm -f logs/guide-*
script=$(mktemp)
trap 'rm -f "$script"' EXIT
{
  echo 'set -euo pipefail'
  echo 'trap "kill \$(jobs -p) 2>/dev/null || true" EXIT'
  # Each ```sh block, echoed before it runs.
  awk '/^```sh$/ { inside = 1; n++; printf "printf \"\\n==> guide block %d\\n\"\n", n; next }
       /^```/ { inside = 0; next }
       inside { print }' docs/guide.md
} > "$script"
blocks=$(grep -c '^```sh$' docs/guide.md)
echo "docs/guide.md: $blocks sh blocks"
timeout 900 bash "$script"
echo "docs/guide.md: every sh block ran"
