#!/usr/bin/env bash
# A bounded, loopback-only abuse test of `afo serve`: slowloris, an idle-connection
# flood, a low open-file limit, 10 MB prompts, a client hanging up during the prefill,
# huge stop strings, a timeout inside the prefill and a kill -9 with streams in flight.
# Each attack is a phase with its own PASS/FAIL line: /health (polled every 50 ms on
# fresh connections) must stay fast, the RSS (sampled every 20 ms) under the cutline,
# every complete request must get an answer and leave one SSOT record. The driver is
# scripts/e2e/abuse.py (Python standard library only); this wrapper prepares what it
# needs:
#   - the afo binary: $AFO_BIN, else `cargo build --release -p afo-cli`;
#   - SmolLM2-135M-Instruct Q4_1 in $AFO_MODEL_DIR or models/ (scripts/fetch-models.sh).
#
# Every server it starts listens on 127.0.0.1 (port 0) and is killed at exit; all traffic
# goes to 127.0.0.1; every phase is bounded and the whole run has a deadline.
#
# Usage: scripts/abuse.sh [abuse.py options]
#   --short           the CI form: fewer connections, shorter prompts (< 2 minutes)
#   --cutline SIZE    memory cutline of the servers (2GiB)
#   --phases LIST     run only these phases, e.g. 1,2,8 (default: all)
#   --max-tokens N    max_tokens of the short requests (32; --short 8)
#   --deadline S      overall deadline in seconds (900; --short 110)
#   --header-timeout S / --idle-timeout S   given to the servers (2 / 2)
#   --no-fail         report only (exit 0); --out DIR (target/abuse); --help
# Output: a table on stdout, target/abuse/summary.json, the SSOT logs and server logs
# in target/abuse/. Exit 0: every phase passed; 1: a phase failed; 2: setup error.
# Examples:
#   scripts/abuse.sh --short
#   AFO_BIN=target/debug/afo scripts/abuse.sh --short --phases 5,7
# Environment: AFO_BIN (skip the build), AFO_MODEL_DIR, CARGO_TARGET_DIR, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python=${PYTHON:-python3}

for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  esac
done

# The afo binary.
if [[ -n "${AFO_BIN:-}" ]]; then
  afo=$AFO_BIN
else
  cargo build --release -p afo-cli
  afo="${CARGO_TARGET_DIR:-$root/target}/release/afo"
fi
[[ -x "$afo" ]] || { echo "abuse: $afo is not an executable" >&2; exit 2; }

# The model.
model="${AFO_MODEL_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || scripts/fetch-models.sh
[[ -f "$model" ]] || { echo "abuse: $model is missing" >&2; exit 2; }

exec "$python" scripts/e2e/abuse.py --afo "$afo" --model "$model" "$@"
