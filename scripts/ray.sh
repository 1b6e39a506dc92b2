#!/usr/bin/env bash
# The afo Ray Serve application (deploy/ray) on a two-node Ray cluster on this
# machine, loopback only: OpenAI clients through the ingress, 1 vs 2 replicas,
# prefix-aware routing, a replica killed mid-load, `afo ssot summary` over the
# replicas' logs. Installs what it needs into target/ray-venv (deploy/ray/requirements.txt
# and the afo package built from crates/python), builds the afo binary, and fails
# without the real model.
#
#   scripts/ray.sh            # 32 concurrent requests per step, longer generations
#   scripts/ray.sh --short    # the CI form: fewer requests, shorter generations
set -euo pipefail
cd "$(dirname "$0")/.."
short=()
limit=1800
if [[ "${1:-}" == "--short" ]]; then
  short=(--short)
  limit=600
fi
if [[ ! -f "${AFO_MODEL_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  scripts/fetch-models.sh
fi
target="${CARGO_TARGET_DIR:-target}"
venv="$target/ray-venv"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" -r deploy/ray/requirements.txt
MATURIN_PEP517_ARGS="--profile ${AFO_PY_PROFILE:-dev}" \
  "${pip[@]}" --force-reinstall --no-deps ./crates/python
cargo build -q -p afo-cli -p afo-workspace-hack

# Ray resolves 127.0.0.1 to the machine's address unless told to stay local.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
# The ingress's retry and error paths with replicas that die on cue (seconds).
timeout -k 10 120 "$venv/bin/python" -m deploy.ray.test_ingress
timeout -k 30 "$limit" "$venv/bin/python" -m deploy.ray.test_cluster "${short[@]}" \
  --afo "$target/debug/afo" --out "$target/ray" --timeout $((limit - 30))
echo "scripts/ray.sh ${short[*]}: $(( $(date +%s) - start )) s"
