"""The one module that talks to the `afo` Python package.

Everything else in the Ray application deals in plain dicts, so that this is the
only place to change if the package's API moves.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import afo

AfoError = afo.AfoError
RefusedError = afo.RefusedError

# Generation arguments passed through from an OpenAI request, with their defaults.
GENERATION_ARGS = {
    "max_tokens": 256,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "seed": None,
    "stop": None,
}


def open_runtime(
    *,
    cutline_bytes: int,
    ssot_log: str,
    replica_id: str,
    node_id: str,
    threads: Optional[int],
) -> "afo.Runtime":
    """A runtime for one replica: its cutline, its own SSOT log, its ids."""
    return afo.Runtime(
        cutline=int(cutline_bytes),
        ssot_log=ssot_log,
        threads=threads,
        replica_id=replica_id,
        node_id=node_id,
    )


def _call_args(req: Dict[str, Any]) -> Dict[str, Any]:
    args: Dict[str, Any] = {}
    if req.get("messages") is not None:
        args["messages"] = req["messages"]
    else:
        args["prompt"] = req.get("prompt", "")
    for name, default in GENERATION_ARGS.items():
        value = req.get(name)
        args[name] = default if value is None else value
    return args


def result_dict(result: Any) -> Dict[str, Any]:
    """A `GenerateResult` as a plain dict (it crosses Ray's process boundary)."""
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": dict(result.usage),
        "timings": dict(result.timings),
        "badge": result.badge,
        "peak_memory_bytes": result.peak_memory_bytes,
        "predicted_peak_bytes": result.predicted_peak_bytes,
        "cutline_bytes": result.cutline_bytes,
        "run_id": result.run_id,
        "model_id": result.model_id,
        "prefix_cache_hit_tokens": result.prefix_cache_hit_tokens,
    }


def generate(rt: "afo.Runtime", model: str, req: Dict[str, Any]) -> Dict[str, Any]:
    """One whole generation; blocks (run it off the event loop)."""
    return result_dict(rt.generate(model, **_call_args(req)))


def stream(rt: "afo.Runtime", model: str, req: Dict[str, Any]) -> Iterator[Any]:
    """An iterator of text deltas; `.result` once exhausted, `.close()` cancels."""
    return rt.stream(model, **_call_args(req))


def stream_result(it: Any) -> Dict[str, Any]:
    return result_dict(it.result)


def health(rt: "afo.Runtime") -> Dict[str, Any]:
    return dict(rt.health())


def preload(rt: "afo.Runtime", model: str) -> None:
    rt.preload(model)
