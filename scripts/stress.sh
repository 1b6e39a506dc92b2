#!/usr/bin/env bash
# A bounded memory-safety stress test of `afo serve`: several models served lazily under
# a cutline, a seeded burst of long / streaming / hung-up / image requests over
# loopback, RSS sampled every 10 ms. Fails on a breach of the cutline, on a lost (or
# extra) SSOT line, on a short request not succeeding within 5 s after the burst, and on
# a crash. The driver is scripts/e2e/stress.py (Python standard library only, so no
# venv or pip install is needed); this wrapper prepares what it needs:
#   - the afo binary: $AFO_BIN, else `cargo build --release -p afo-cli`;
#   - SmolLM2-135M-Instruct Q4_1 in $AFO_MODEL_DIR or models/ (scripts/fetch-models.sh);
#   - its exports, made once and cached in target/stress/models/ (`afo quantize`):
#     SmolLM2-135M-Instruct.<scheme>.gguf for each scheme asked for;
#   - the tiny seeded vision-language model (only when `vlm` is in --models and no
#     --vlm DIR is given), cached in target/stress/models/tiny-vlm (see below).
#
# Usage: scripts/stress.sh [--models SET] [--vlm DIR] [stress.py options]
#   --models SET  comma-separated: q4_1 (the fetched model), vlm, or any `afo quantize`
#                 scheme (f32, q8_0, f16, int8, ...); or `text` (= q4_1,f32,q8_0) or
#                 `all` (= text + vlm, the default)
#   --vlm DIR     a Qwen3-VL folder to serve as the vision-language model (adds `vlm`)
#   stress.py options: --cutline 700MiB --seed 1 --clients 12 --requests 4 --short
#                 --no-fail --deadline S --request-timeout S --out DIR ... (--help)
# Examples:
#   scripts/stress.sh --cutline 700MiB --seed 3 --models text
#   AFO_BIN=/path/to/afo scripts/stress.sh --short
# Environment: AFO_BIN (skip the build), AFO_MODEL_DIR, CARGO_TARGET_DIR, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache="$root/target/stress/models"
python=${PYTHON:-python3}

models_set=all
vlm_dir=""
pass=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --models) [[ $# -ge 2 ]] || { echo "stress: --models needs a value" >&2; exit 2; }
              models_set=$2; shift 2 ;;
    --models=*) models_set=${1#*=}; shift ;;
    --vlm) [[ $# -ge 2 ]] || { echo "stress: --vlm needs a value" >&2; exit 2; }
           vlm_dir=$2; shift 2 ;;
    --vlm=*) vlm_dir=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
models_set=${models_set//text/q4_1,f32,q8_0}
models_set=${models_set//all/q4_1,f32,q8_0,vlm}
IFS=, read -r -a wanted <<<"$models_set"
if [[ -n "$vlm_dir" && ! " ${wanted[*]} " =~ " vlm " ]]; then
  wanted+=(vlm)
fi

# The afo binary.
if [[ -n "${AFO_BIN:-}" ]]; then
  afo=$AFO_BIN
else
  cargo build --release -p afo-cli
  afo="${CARGO_TARGET_DIR:-$root/target}/release/afo"
fi
[[ -x "$afo" ]] || { echo "stress: $afo is not an executable" >&2; exit 2; }

# The source model.
model="${AFO_MODEL_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || scripts/fetch-models.sh
[[ -f "$model" ]] || { echo "stress: $model is missing" >&2; exit 2; }
mkdir -p "$cache"

# Writes the tiny seeded VLM (TinyVlm::default()) to $1 with the engine's example, as
# scripts/e2e.sh does.
write_tiny_vlm() {
  local dest=$1
  mkdir -p "$(dirname "$dest")"
  cargo run -q -p afo-engine --example write_tiny_vlm -- "$dest.part"
  mv "$dest.part" "$dest"
  [[ -d "$dest" ]] || { echo "stress: could not write the tiny VLM; give one with --vlm DIR or use --models text" >&2; exit 2; }
}

serve_models=()
for w in "${wanted[@]}"; do
  case "$w" in
    "") ;;
    q4_1|Q4_1) serve_models+=("$model") ;;
    vlm)
      if [[ -z "$vlm_dir" ]]; then
        vlm_dir="$cache/tiny-vlm"
        [[ -d "$vlm_dir" ]] || { echo "stress: writing the tiny VLM to $vlm_dir" >&2; write_tiny_vlm "$vlm_dir"; }
      fi
      [[ -d "$vlm_dir" ]] || { echo "stress: --vlm $vlm_dir is not a folder" >&2; exit 2; }
      serve_models+=("$(cd "$vlm_dir" && pwd)") ;;
    *)
      # An export of the source model, made once. Written next to its final name and
      # renamed, so that an interrupted export is never taken for a finished one.
      out="$cache/SmolLM2-135M-Instruct.$w.gguf"
      if [[ ! -f "$out" ]]; then
        echo "stress: exporting $w to $out" >&2
        tmp_dir=$(mktemp -d "$cache/.export.XXXXXX")
        "$afo" quantize --model "$model" --scheme "$w" --out "$tmp_dir/model.gguf" >&2
        mv "$tmp_dir/model.gguf" "$out"
        rm -rf "$tmp_dir"
      fi
      serve_models+=("$out") ;;
  esac
done
[[ ${#serve_models[@]} -gt 0 ]] || { echo "stress: --models $models_set names no model" >&2; exit 2; }

args=(--afo "$afo")
for m in "${serve_models[@]}"; do args+=(--model "$m"); done
exec "$python" scripts/e2e/stress.py "${args[@]}" "${pass[@]}"
