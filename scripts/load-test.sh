#!/usr/bin/env bash
# A bounded loopback load test of `afo serve` on SmolLM2: CLIENTS concurrent streaming
# clients (the official openai package) send REQUESTS chat completions of MAX_TOKENS
# tokens; fails on any error other than intended 429s, on memory reaching the cutline,
# or on a lost SSOT line. Prints throughput and latency / time-to-first-token
# percentiles as JSON.
#
# Usage: scripts/load-test.sh [CLIENTS] [REQUESTS] [MAX_TOKENS] [-- afo serve options]
# Environment: PROFILE=release|dev (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
clients=${1:-32}; requests=${2:-128}; max_tokens=${3:-32}
shift $(( $# < 3 ? $# : 3 ))
[[ "${1:-}" == "--" ]] && shift
serve_args=("$@")
[[ ${#serve_args[@]} -gt 0 ]] || serve_args=(--cutline 1GiB --max-batch 8 --max-queue 16)
model="${AFO_MODEL_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || scripts/fetch-models.sh
out="$root/target/load-test"
mkdir -p "$out"

venv="$root/target/e2e-venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check openai

profile=${PROFILE:-release}
if [[ "$profile" == release ]]; then
  cargo build --release -p afo-cli
  afo="${CARGO_TARGET_DIR:-$root/target}/release/afo"
else
  cargo build -p afo-cli
  afo="${CARGO_TARGET_DIR:-$root/target}/debug/afo"
fi

log="$out/runs.jsonl"
rm -f "$log"
"$afo" --threads 2 serve --model "$model" --port 0 --log "$log" "${serve_args[@]}" >"$out/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 1 600); do
  addr=$(grep -o 'listening on http://[0-9.:]*' "$out/serve.log" | head -1 | sed 's/listening on //' || true)
  [[ -n "$addr" ]] && break
  kill -0 "$pid" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$addr" ]] || { cat "$out/serve.log" >&2; echo "load test: afo serve did not start" >&2; exit 1; }
"$venv/bin/python" scripts/e2e/load_test.py "$addr/v1" SmolLM2-135M-Instruct.Q4_1 "$log" "$clients" "$requests" "$max_tokens"
kill -TERM "$pid"
wait "$pid"
trap - EXIT
