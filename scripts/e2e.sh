#!/usr/bin/env bash
# End-to-end tests of `afo serve` with real clients:
#   1. the official `openai` Python package (models, chat, streaming chat, completions,
#      errors) against a server with an API key;
#   2. headless Chromium (Debian's `chromium`, driven by playwright-core) against the
#      dashboard of a server with a tiny cutline: the badge reads SAFE, then changes
#      when loading the model pushes memory past the warn threshold; screenshots go to
#      target/e2e-artifacts/.
# Installs what it needs (pip into target/e2e-venv, apt chromium, npm playwright-core
# into a temporary folder), builds `afo`, and fails loudly on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
artifacts="$root/target/e2e-artifacts"
mkdir -p "$artifacts"
rm -f "$artifacts"/runs-*.jsonl "$artifacts"/*.png
model="${AFO_MODEL_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
model_id="SmolLM2-135M-Instruct.Q4_1"
say() { printf '\n==> %s\n' "$*"; }

if [[ ! -f "$model" ]]; then
  say "fetching the test model"
  scripts/fetch-models.sh
fi
[[ -f "$model" ]] || { echo "e2e: $model is missing" >&2; exit 1; }

say "installing the clients"
venv="$root/target/e2e-venv"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check openai
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
chromium_bin=$(command -v chromium)
pw_dir=$(mktemp -d)
(cd "$pw_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)

say "building afo"
cargo build -p afo-cli
afo="$root/target/debug/afo"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$pw_dir"
}
trap cleanup EXIT

# Starts `afo serve ARGS...` on a free port; sets $base to its URL.
start_server() {
  local log=$1; shift
  "$afo" serve --port 0 "$@" >"$log" 2>&1 &
  pids+=($!)
  local pid=$! addr=""
  for _ in $(seq 1 600); do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$log" | head -1 | sed 's/listening on //' || true)
    [[ -n "$addr" ]] && break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "e2e: afo serve exited" >&2; exit 1; }
    sleep 0.1
  done
  [[ -n "$addr" ]] || { cat "$log" >&2; echo "e2e: afo serve did not start" >&2; exit 1; }
  base="$addr"
}

say "openai client against afo serve"
key="e2e-$(date +%s)"
start_server "$artifacts/serve-openai.log" --model "$model" --api-key "$key" --log "$artifacts/runs-openai.jsonl"
"$venv/bin/python" scripts/e2e/openai_client.py "$base/v1" "$key" "$model_id"

say "headless Chromium against the dashboard"
# A cutline a little above the loaded model, warn at half of it: an idle server is
# SAFE; once the model loads, resident memory is past the warn threshold.
start_server "$artifacts/serve-dashboard.log" --model "$model" --lazy --cutline 160MB --warn-fraction 0.5 --api-key "$key" --log "$artifacts/runs-dashboard.jsonl"
PLAYWRIGHT_DIR="$pw_dir/node_modules" CHROMIUM="$chromium_bin" node scripts/e2e/dashboard.mjs "$base" "$key" "$model_id" "$artifacts"
[[ -s "$artifacts/dashboard.png" ]] || { echo "e2e: no screenshot" >&2; exit 1; }

say "graceful shutdown"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid" || { echo "e2e: afo serve exited with an error on SIGTERM" >&2; exit 1; }; done
pids=()
grep -q "afo serve: stopped" "$artifacts/serve-openai.log" || { echo "e2e: no clean stop" >&2; exit 1; }
lines=$(wc -l <"$artifacts/runs-openai.jsonl")
[[ "$lines" -eq 4 ]] || { echo "e2e: expected 4 SSOT lines from the openai checks, found $lines" >&2; exit 1; }

say "e2e passed (artifacts in $artifacts)"
