"""afo: local LLM and VLM inference under a memory cutline, one SSOT record per run.

    import afo

    rt = afo.Runtime(cutline="8GiB", ssot_log="runs.jsonl")
    r = rt.generate("models/SmolLM2-135M-Instruct.Q4_1.gguf",
                    messages=[{"role": "user", "content": "Write a haiku about Rust"}],
                    max_tokens=64)
    print(r.text, r.usage, r.badge, r.peak_memory_bytes)

    for delta in rt.stream("models/SmolLM2-135M-Instruct.Q4_1.gguf", prompt="Once upon"):
        print(delta, end="", flush=True)

See help(afo.Runtime). The types are in afo/__init__.pyi.
"""

from afo._afo import (
    AfoError,
    ChainResult,
    GenerateResult,
    ModelError,
    QueryResult,
    RefusedError,
    Runtime,
    Stream,
    __version__,
    write_tiny_vlm,
)

__all__ = [
    "AfoError",
    "ChainResult",
    "GenerateResult",
    "ModelError",
    "QueryResult",
    "RefusedError",
    "Runtime",
    "Stream",
    "__version__",
    "write_tiny_vlm",
]
