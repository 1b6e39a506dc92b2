"""Fixtures: the real test model (a missing model fails the tests), a fresh log."""

import json
import os
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def model() -> str:
    """SmolLM2 in $AFO_MODEL_DIR (default models/ at the repository root)."""
    folder = pathlib.Path(os.environ.get("AFO_MODEL_DIR", ROOT / "models"))
    path = folder / MODEL_NAME
    assert path.is_file(), f"{path} is missing: run scripts/fetch-models.sh"
    return str(path)


@pytest.fixture(scope="session")
def sample_jpeg() -> pathlib.Path:
    path = ROOT / "crates" / "cli" / "assets" / "sample.jpg"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture
def log(tmp_path) -> pathlib.Path:
    return tmp_path / "runs.jsonl"


def records(log: pathlib.Path) -> list:
    """Every record of an SSOT log (none when it does not exist yet)."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def wait_for_record(log: pathlib.Path, run_count: int, timeout_s: float = 20.0) -> list:
    """The log's records once it holds `run_count` of them (a dropped stream's run
    ends on its own thread and writes its record a moment later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = records(log)
        if len(found) >= run_count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
