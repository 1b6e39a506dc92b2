"""`AfoReplica`: one Ray Serve replica embedding one `afo.Runtime`.

Cutline rule (`cutline_for`): the memory Ray gives the replica, M, is the `memory`
in its `ray_actor_options` (what `get_assigned_resources()` reports) or, when none was
asked for, the `memory` resource of the node it runs on. The cutline is M less a
margin of `max(margin_bytes, margin_fraction * M)` (256 MiB and 20% by default): the
margin covers the Python interpreter, Ray's worker and the runtime's own unaccounted
bytes, which the ledger does not reserve.

Compute threads: the replica's CPUs (`num_cpus` in `ray_actor_options`), at least one.

Each replica writes its own SSOT log, `<ssot_dir>/<replica_id>.jsonl`, and names
itself in every record (`replica_id`: Serve's replica unique id, `node_id`: Ray's
node id).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from typing import Any, AsyncIterator, Dict, Optional

import ray
from ray import serve

from . import adapter

MIB = 1 << 20
DEFAULT_MARGIN_BYTES = 256 * MIB
DEFAULT_MARGIN_FRACTION = 0.2

_DONE = object()


def cutline_for(memory_bytes: int, margin_bytes: int = DEFAULT_MARGIN_BYTES,
                margin_fraction: float = DEFAULT_MARGIN_FRACTION) -> int:
    """The cutline for a replica given `memory_bytes`: that less the margin."""
    margin = max(int(margin_bytes), int(margin_fraction * memory_bytes))
    cutline = int(memory_bytes) - margin
    if cutline <= 0:
        raise ValueError(
            f"a replica given {memory_bytes} bytes has no room under a margin of {margin} bytes: "
            "give it more memory (ray_actor_options memory) or a smaller margin"
        )
    return cutline


def _node_memory(node_id: str) -> Optional[int]:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            mem = node.get("Resources", {}).get("memory")
            return int(mem) if mem else None
    return None


def error_event(status: int, code: str, message: str, **extra: Any) -> Dict[str, Any]:
    return {"event": "error", "status": status, "code": code, "message": message, **extra}


class AfoReplica:
    """The replica class; `app.build_app` wraps it with `serve.deployment`."""

    def __init__(self, model: str, ssot_dir: str, margin_bytes: int = DEFAULT_MARGIN_BYTES,
                 margin_fraction: float = DEFAULT_MARGIN_FRACTION, preload: bool = True):
        ctx = ray.get_runtime_context()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = ctx.get_node_id()
        self.actor_id = ctx.get_actor_id()
        assigned = ctx.get_assigned_resources()
        memory = assigned.get("memory") or _node_memory(self.node_id)
        if not memory:
            raise RuntimeError(f"replica {self.replica_id}: Ray reports no memory for it or its node {self.node_id}")
        self.memory_bytes = int(memory)
        self.cutline_bytes = cutline_for(self.memory_bytes, margin_bytes, margin_fraction)
        self.threads = max(1, int(math.floor(assigned.get("CPU", 1) or 1)))
        self.model = model
        os.makedirs(ssot_dir, exist_ok=True)
        self.ssot_log = os.path.join(ssot_dir, f"{self.replica_id}.jsonl")
        self.rt = adapter.open_runtime(
            cutline_bytes=self.cutline_bytes,
            ssot_log=self.ssot_log,
            replica_id=self.replica_id,
            node_id=self.node_id,
            threads=self.threads,
        )
        if preload:
            adapter.preload(self.rt, model)
        self.ongoing = 0

    def _ids(self) -> Dict[str, Any]:
        return {"replica_id": self.replica_id, "node_id": self.node_id, "pid": os.getpid(),
                "actor_id": self.actor_id}

    async def health(self, req: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        h = await asyncio.to_thread(adapter.health, self.rt)
        return {**self._ids(), "memory_bytes": self.memory_bytes, "cutline_bytes": self.cutline_bytes,
                "threads": self.threads, "ssot_log": self.ssot_log, "ongoing": self.ongoing,
                "runtime": h}

    async def run(self, req: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        """Events of one request: `start` (who runs it), then `delta`s when streamed,
        then `result` or `error`."""
        self.ongoing += 1
        try:
            yield {"event": "start", **self._ids()}
            if req.get("stream"):
                async for ev in self._stream(req):
                    yield ev
            else:
                try:
                    result = await asyncio.to_thread(adapter.generate, self.rt, self.model, req)
                except Exception as e:  # noqa: BLE001 - mapped to an HTTP error
                    yield self._error(e)
                    return
                yield {"event": "result", "result": result}
        finally:
            self.ongoing -= 1

    def _error(self, e: Exception) -> Dict[str, Any]:
        if isinstance(e, adapter.RefusedError):
            return error_event(503, "memory_unavailable", str(e), **self._ids())
        if isinstance(e, (ValueError, TypeError)):
            return error_event(400, "invalid_request_error", str(e), **self._ids())
        return error_event(500, "runtime_error", f"{type(e).__name__}: {e}", **self._ids())

    async def _stream(self, req: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        # The afo iterator blocks; a thread drives it and hands events to the loop.
        # Only that thread touches the iterator: it closes it (cancelling the run)
        # when the consumer went away.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the replica is going away
                pass

        def produce() -> None:
            it = None
            try:
                it = adapter.stream(self.rt, self.model, req)
                for delta in it:
                    if cancelled.is_set():
                        it.close()
                        return
                    put({"event": "delta", "text": delta})
                put({"event": "result", "result": adapter.stream_result(it)})
            except Exception as e:  # noqa: BLE001 - sent to the client as an error event
                put(self._error(e))
            finally:
                put(_DONE)

        thread = threading.Thread(target=produce, name=f"afo-stream-{self.replica_id}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                yield item
        finally:
            cancelled.set()
