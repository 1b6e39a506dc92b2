"""Prefix-affinity routing: keep a conversation on the replica that cached its prefix.

The ingress renders each request's conversation into plain text and keeps its first
`prefix_chars` characters as the request's *route key*. `PrefixAffinityRouter`, a Ray
Serve custom request router (`ray.serve.request_router.RequestRouter`), ranks the live
replicas by rendezvous hashing (highest random weight) of that key: every router
computes the same order, and when a replica leaves, only the keys it owned move. The
first replica of that order is preferred unless it is busier than the least-loaded
replica by `imbalance_threshold` ongoing requests or more; then the least-loaded one
goes first. Requests without a key (health probes aside) use the least-loaded replica.

A request may also name its replica (`target_replica`, a replica's unique id): the
ingress does this to ask each replica for its health. A named replica that is not live
gets the request sent to another one, whose answer names itself.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Dict, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def render_conversation(messages: Optional[List[Dict[str, Any]]], prompt: Optional[str]) -> str:
    """The text a route key is cut from: each message as `role\\ncontent\\n`."""
    if messages is None:
        return prompt or ""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}\n{content or ''}\n")
    return "".join(parts)


def route_key(messages: Optional[List[Dict[str, Any]]], prompt: Optional[str], prefix_chars: int) -> str:
    """The first `prefix_chars` characters of the rendered conversation."""
    return render_conversation(messages, prompt)[:prefix_chars]


def rendezvous_order(key: str, replica_ids: List[str]) -> List[str]:
    """Replica ids from most to least preferred for `key` (highest random weight)."""

    def weight(rid: str) -> int:
        digest = hashlib.blake2b(f"{rid}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(replica_ids, key=weight, reverse=True)


def request_fields(pending_request: Optional[PendingRequest]) -> Dict[str, Any]:
    """The routing fields of a request: its first argument, a dict built by the ingress."""
    if pending_request is None:
        return {}
    for arg in pending_request.args or ():
        if isinstance(arg, dict):
            return arg
    return {}


class PrefixAffinityRouter(RequestRouter):
    """Rendezvous hashing of the route key, with a least-loaded fallback.

    `request_router_kwargs`:
    - `policy`: `"prefix"` (default) or `"random"` (uniform over replicas that have
      room; for comparison);
    - `imbalance_threshold` (default 4): how many more ongoing requests than the
      least-loaded replica the preferred one may have before it is passed over.
    """

    def initialize_state(self, policy: str = "prefix", imbalance_threshold: int = 4, **kwargs: Any) -> None:
        if policy not in ("prefix", "random"):
            raise ValueError(f"PrefixAffinityRouter: policy must be 'prefix' or 'random', got {policy!r}")
        self._policy = policy
        self._imbalance_threshold = int(imbalance_threshold)

    async def _queue_lens(self, replicas: List[RunningReplica]) -> Dict[Any, Optional[int]]:
        lens: Dict[Any, Optional[int]] = {}
        missing = []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                missing.append(r)
            else:
                lens[r.replica_id] = q
        if missing:
            for r, q in await self._probe_queue_lens(missing, 0):
                lens[r.replica_id] = q
        return lens

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        fields = request_fields(pending_request)

        target = fields.get("target_replica")
        if target is not None:
            named = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            # A target that is not among the live replicas (one that has just died,
            # which the ingress can still list) goes to any live one, which answers
            # with its own id and the ingress reports the target unreachable: a request
            # no candidate takes holds one of the router's few routing tasks in backoff,
            # and a handful of them stalled every request, health probes included.
            return [named] if named else [[r] for r in candidate_replicas]

        if self._policy == "random":
            shuffled = list(candidate_replicas)
            random.shuffle(shuffled)
            return [[r] for r in shuffled]

        lens = await self._queue_lens(candidate_replicas)
        # A replica that did not answer sorts last.
        load = {r.replica_id: (lens.get(r.replica_id) if lens.get(r.replica_id) is not None else 1 << 30)
                for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: load[r.replica_id])

        key = fields.get("route_key")
        if not key:
            return [[r] for r in by_load]

        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = [by_id[rid] for rid in rendezvous_order(key, list(by_id))]
        preferred = order[0]
        least = by_load[0]
        if load[preferred.replica_id] - load[least.replica_id] >= self._imbalance_threshold:
            # Too busy: least-loaded first, then the hash order.
            return [[least]] + [[r] for r in order if r is not least]
        return [[r] for r in order]
