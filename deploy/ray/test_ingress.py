"""The ingress's failure handling, without a cluster: fake replica handles that die at
chosen points, driving the real `Ingress` class (its retry, 503 and stream-error
paths). Seconds to run; `scripts/ray.sh` runs it before the cluster test, whose SIGKILL
of a real replica cannot choose whether a request had produced output yet.

    python -m deploy.ray.test_ingress
"""

import asyncio
import json
import sys
from types import SimpleNamespace
from typing import Any, Dict, List

from ray.exceptions import ActorDiedError

from deploy.ray.ingress import Ingress, ReplicaFailed
from deploy.ray.routing import PrefixAffinityRouter

# `serve.ingress` wraps the class in an ASGI wrapper (whose `__init__` is async); the
# class as written is the next one in the wrapper's MRO.
IngressClass = next(c for c in Ingress.func_or_class.__mro__[1:] if c.__name__ == "Ingress")


class FakeCall:
    """One `run.remote(req)` stream: yields its events, raising the exceptions among them."""

    def __init__(self, events: List[Any]):
        self.events = list(events)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.events:
            raise StopAsyncIteration
        ev = self.events.pop(0)
        if isinstance(ev, BaseException):
            raise ev
        return ev

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplicas:
    """Stands for the `AfoReplica` deployment handle: each call takes the next script."""

    def __init__(self, scripts: List[List[Any]]):
        self.scripts = list(scripts)
        self.calls: List[FakeCall] = []
        self.run = self

    def options(self, **_: Any) -> "FakeReplicas":
        return self

    def remote(self, _req: Dict[str, Any]) -> FakeCall:
        call = FakeCall(self.scripts.pop(0))
        self.calls.append(call)
        return call


class FakeHealth:
    """Stands for the handle's `health` method: every probe answers `answer`."""

    def __init__(self, answer: Dict[str, Any]):
        self.answer = answer

    def remote(self, _req: Dict[str, Any]) -> "FakeProbe":
        return FakeProbe(self.answer)


class FakeProbe:
    """One `health.remote(...)` response."""

    def __init__(self, answer: Dict[str, Any]):
        self.answer = answer

    def __await__(self):
        async def get() -> Dict[str, Any]:
            return self.answer
        return get().__await__()

    def cancel(self) -> None:
        pass


def start(replica: str) -> Dict[str, Any]:
    return {"event": "start", "replica_id": replica, "node_id": f"node-{replica}", "actor_id": f"actor-{replica}"}


def result(text: str) -> Dict[str, Any]:
    return {"event": "result", "result": {
        "text": text, "finish_reason": "stop", "run_id": "r", "badge": "SAFE", "timings": {},
        "prefix_cache_hit_tokens": 0, "peak_memory_bytes": 1, "cutline_bytes": 2,
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}}


def delta(text: str) -> Dict[str, Any]:
    return {"event": "delta", "text": text}


def died() -> BaseException:
    return ActorDiedError()


def ingress(scripts: List[List[Any]], max_attempts: int = 3) -> Any:
    return IngressClass(FakeReplicas(scripts), model="m.gguf", model_name="m", max_attempts=max_attempts)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

failures = 0


def check(ok: bool, what: str) -> None:
    global failures
    print(f"  {'ok' if ok else 'FAIL'}: {what}", flush=True)
    if not ok:
        failures += 1


async def body_of(response: Any) -> str:
    chunks = []
    async for part in response.body_iterator:
        chunks.append(part if isinstance(part, str) else part.decode())
    return "".join(chunks)


async def main() -> int:
    print("== the ingress's failure handling (fake replicas)", flush=True)

    # 1. A non-streamed request whose replica dies before answering is retried elsewhere.
    ing = ingress([[start("a"), died()], [start("b"), result("hello")]])
    resp = await ing._respond(dict(CHAT), chat=True)
    body = json.loads(resp.body)
    check(resp.status_code == 200, f"non-streamed, replica died before answering: 200 ({resp.status_code})")
    check(body.get("replica_id") == "b" and body["choices"][0]["message"]["content"] == "hello",
          "the answer came from the second replica")
    check(ing.retries == 1 and ing.failed == 0, f"counted as one retry, no failure ({ing.retries}, {ing.failed})")

    # 2. A stream whose replica dies before its first token is retried too.
    ing = ingress([[start("a"), died()], [start("b"), delta("he"), delta("llo"), result("hello")]])
    resp = await ing._respond(dict(CHAT, stream=True), chat=True)
    text = await body_of(resp)
    check(resp.status_code == 200 and '"content":"he"' in text and '"content":"llo"' in text,
          "a stream whose replica died before its first token is served by another replica")
    check('"replica_id":"b"' in text and '"replica_id":"a"' not in text and text.endswith("data: [DONE]\n\n"),
          "every chunk names the replica that served it; the stream ends with [DONE]")
    check(ing.retries == 1, f"one retry ({ing.retries})")

    # 3. A stream that had produced a token is not retried: it ends with an error naming the replica.
    ing = ingress([[start("a"), delta("he"), died()], [start("b"), result("never")]])
    resp = await ing._respond(dict(CHAT, stream=True), chat=True)
    text = await body_of(resp)
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    check(len(errors) == 1 and errors[0]["code"] == "replica_unavailable" and errors[0]["replica_id"] == "a",
          "a stream with output ends with one replica_unavailable error naming replica a")
    check(ing.retries == 0 and ing.failed == 1 and len(ing.replicas.calls) == 1,
          f"not retried, counted as failed ({ing.retries}, {ing.failed}, {len(ing.replicas.calls)} call)")

    # 4. Every attempt dies (a /v1/completions request): a 503 naming the last replica, after max_attempts tries.
    ing = ingress([[start("a"), died()], [start("b"), died()], [start("c"), died()]])
    resp = await ing._respond({"model": "m", "prompt": "Once", "max_tokens": 4}, chat=False)
    err = json.loads(resp.body)["error"]
    check(resp.status_code == 503 and err["code"] == "replica_unavailable" and err["replica_id"] == "c",
          f"every attempt failed: 503 replica_unavailable naming replica c ({resp.status_code}, {err})")
    check(resp.headers.get("retry-after") == "1" and len(ing.replicas.calls) == 3 and ing.retries == 2,
          "three attempts in all, Retry-After: 1")

    # 5. The events generator raises ReplicaFailed (used by `_sse`) with the replica in it.
    ing = ingress([[start("a"), delta("x"), died()]])
    _, events = await ing._events({"stream": True})
    got: List[Any] = []
    try:
        async for ev in events:
            got.append(ev)
    except ReplicaFailed as e:
        got.append(e)
    check(isinstance(got[-1], ReplicaFailed) and got[-1].replica_id == "a" and "ActorDiedError" in str(got[-1]),
          "a failure mid-stream raises ReplicaFailed naming the replica and the cause")

    # 6. Health probes name their replica. The router sends a probe for a replica that
    # is not live to a live one (a request no replica takes would hold a routing task
    # in backoff), and the ingress reports the named replica unreachable.
    live = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("a", "b")]
    choose = PrefixAffinityRouter.choose_replicas
    named = await choose(SimpleNamespace(), live, SimpleNamespace(args=({"target_replica": "b"},)))
    check(named == [[live[1]]], "a probe for a live replica goes to that replica alone")
    gone = await choose(SimpleNamespace(), live, SimpleNamespace(args=({"target_replica": "x"},)))
    check(gone == [[live[0]], [live[1]]], "a probe for a replica that is not live goes to any live one")
    ing = ingress([])
    ing.replicas.health = FakeHealth({"replica_id": "b", "actor_id": "actor-b"})
    h = await ing._replica_health("x")
    check(h["status"] == "unreachable" and h["replica_id"] == "x" and "replica b answered" in h["error"],
          f"the ingress reports it unreachable ({h})")
    h = await ing._replica_health("b")
    check(h["status"] == "ok" and h["replica_id"] == "b", "and a replica that answers for itself ok")

    print("PASS" if not failures else f"FAIL ({failures})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
