#!/usr/bin/env bash
# End-to-end tests of `afo serve` with real clients:
#   1. the official `openai` Python package (models, chat, streaming chat, completions,
#      errors) against a server with an API key, and one image request (a PNG data URL)
#      to a second server over the tiny seeded VLM;
#   2. headless Chromium (Debian's `chromium`, driven by playwright-core) against the
#      dashboard of a server with a tiny cutline: the badge reads SAFE, then changes
#      when loading the model pushes memory past the warn threshold; then, during a
#      bounded burst of concurrent requests (loopback), the charts (memory against the
#      cutline and warn lines with predicted and measured peaks, tokens/s, TTFT, queue
#      depth, badge strip) and the server's /api/history; screenshots go to
#      target/e2e-artifacts/ (dashboard-load.png is the one in docs/dashboard.png).
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
"$venv/bin/pip" install --quiet --disable-pip-version-check openai anthropic jsonschema
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
cargo build -p afo-cli -p afo-workspace-hack
afo="${CARGO_TARGET_DIR:-$root/target}/debug/afo"

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
"$venv/bin/python" scripts/e2e/embeddings.py "$base/v1" "$key" "$model_id"
"$venv/bin/python" scripts/e2e/agent.py "$base/v1" "$key" "$model_id"

say "openai client sends an image to afo serve over the tiny VLM"
vlm_dir="$root/target/e2e-tiny-vlm"
rm -rf "$vlm_dir"
cargo run -q -p afo-engine --example write_tiny_vlm -- "$vlm_dir"
start_server "$artifacts/serve-vlm.log" --model "$vlm_dir" --api-key "$key" --log "$artifacts/runs-vlm.jsonl"
"$venv/bin/python" - "$base/v1" "$key" "$(basename "$vlm_dir")" <<'PY'
"""One image request (a PNG data URL) through the official client; usage counts it."""
import base64
import struct
import sys
import zlib

import openai
from openai import OpenAI

base, key, model = sys.argv[1:4]


def png(w, h):
    rows = bytearray()
    for y in range(h):
        rows.append(0)
        for x in range(w):
            rows += bytes((x * 255 // w, y * 255 // h, 128))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b""))


url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
client = OpenAI(base_url=base, api_key=key)
ids = [m.id for m in client.models.list().data]
assert model in ids, ids


def ask(content):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0)
    assert r.object == "chat.completion", r
    assert isinstance(r.choices[0].message.content, str), r
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
    return r.usage


text = ask("What is in the picture?")
image = ask([{"type": "text", "text": "What is in the picture?"},
             {"type": "image_url", "image_url": {"url": url}}])
assert image.prompt_tokens > text.prompt_tokens + 2, (text, image)
try:
    ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                   + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 40).decode()}}])
    raise SystemExit("a corrupt image was accepted")
except openai.BadRequestError as e:
    assert "image 1" in str(e), e
print(f"vision ok: prompt tokens {text.prompt_tokens} text-only, {image.prompt_tokens} with one image")
PY

say "headless Chromium against the dashboard"
# A cutline with room for the model's load (a quantized file reserves twice its size
# while it loads), warn at 30% of it: an idle server is SAFE; once the model is
# loaded, resident memory is past the warn threshold.
start_server "$artifacts/serve-dashboard.log" --model "$model" --lazy --cutline 300MB --warn-fraction 0.3 --api-key "$key" --log "$artifacts/runs-dashboard.jsonl"
PLAYWRIGHT_DIR="$pw_dir/node_modules" CHROMIUM="$chromium_bin" node scripts/e2e/dashboard.mjs "$base" "$key" "$model_id" "$artifacts"
for shot in dashboard.png dashboard-load.png; do
  [[ -s "$artifacts/$shot" ]] || { echo "e2e: no screenshot $shot" >&2; exit 1; }
done

say "graceful shutdown"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid" || { echo "e2e: afo serve exited with an error on SIGTERM" >&2; exit 1; }; done
pids=()
grep -q "afo serve: stopped" "$artifacts/serve-openai.log" || { echo "e2e: no clean stop" >&2; exit 1; }
lines=$(wc -l <"$artifacts/runs-openai.jsonl")
# openai_client.py: four completed requests, and one record for each refused one
# (unknown model, empty messages); the wrong key is turned away before any route, with
# no record. embeddings.py: four requests and one refused (`dimensions`). agent.py: 117
# runs, none refused (50 schema, 50 forced calls, a tool result, 1 + 2 x 3 choices, 4
# responses, 5 messages; each choice of `n` is a run of its own).
[[ "$lines" -eq 128 ]] || { echo "e2e: expected 6 + 5 + 117 SSOT lines from the client checks, found $lines" >&2; exit 1; }
errors=$(grep -c '"status":"error"' "$artifacts/runs-openai.jsonl" || true)
[[ "$errors" -eq 3 ]] || { echo "e2e: expected 3 refused requests in the SSOT log, found $errors" >&2; exit 1; }
embeddings=$(grep -c '"chain":"embeddings"' "$artifacts/runs-openai.jsonl" || true)
[[ "$embeddings" -eq 5 ]] || { echo "e2e: expected 5 embeddings records, found $embeddings" >&2; exit 1; }
vlm_lines=$(wc -l <"$artifacts/runs-vlm.jsonl")
# Two completed image requests and the refused corrupt image.
[[ "$vlm_lines" -eq 3 ]] || { echo "e2e: expected 3 SSOT lines from the image checks, found $vlm_lines" >&2; exit 1; }
grep -q '"image_pixels":[1-9]' "$artifacts/runs-vlm.jsonl" || { echo "e2e: no SSOT line with image_pixels" >&2; exit 1; }

say "e2e passed (artifacts in $artifacts)"
