#!/usr/bin/env bash
# Builds the afo Python package (crates/python) into a virtual environment and runs
# its tests against the real SmolLM2 model (fetched when missing):
#
#   python3 -m venv target/py-venv
#   target/py-venv/bin/pip install maturin pytest
#   target/py-venv/bin/pip install ./crates/python     # maturin is the build backend
#   target/py-venv/bin/pytest crates/python/tests -q
#
# The extension is built with the dev profile (the workspace compiles dependencies
# and the hot crates with optimisation), which keeps CI fast; users get the release
# profile from a plain `pip install ./crates/python`. AFO_PY_PROFILE=release builds
# that instead. About 20 s to build and 15 s of tests on 2 cores once the
# workspace's dependencies are built.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f "${AFO_MODEL_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  scripts/fetch-models.sh
fi
venv="${CARGO_TARGET_DIR:-target}/py-venv"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check maturin pytest
profile="${AFO_PY_PROFILE:-dev}"
MATURIN_PEP517_ARGS="--profile $profile" \
  "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./crates/python
"$venv/bin/python" -c 'import afo; print("afo", afo.__version__, "from", afo.__file__)'
"$venv/bin/pytest" crates/python/tests -q
