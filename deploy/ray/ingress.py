"""The OpenAI-compatible ingress: FastAPI behind Ray Serve's HTTP proxy.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (both with SSE
streaming in OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`,
`GET /health` (every replica's `rt.health()` with its replica and node ids).

Each request is sent to the `AfoReplica` deployment through one handle whose request
router is `routing.PrefixAffinityRouter`; the ingress puts the route key (the first
`prefix_chars` characters of the rendered conversation) in the request.

Failures: a replica that dies takes its in-flight requests with it. A request is
retried on another replica (up to `max_attempts` in all) when nothing of it has
reached the client yet: a non-streamed request, or a stream before its first token
(the ingress holds the response until then). Otherwise a non-streamed request gets
HTTP 503 `replica_unavailable` and a stream ends with a `data: {"error": ...}` event,
both naming the replica. Every response and chunk carries `replica_id`.
"""


import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ObjectLostError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from .routing import route_key

logger = logging.getLogger("ray.serve")

REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, ObjectLostError)
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"

api = FastAPI(title="afo on Ray Serve")


def error_response(status: int, code: str, message: str, etype: Optional[str] = None,
                   param: Optional[str] = None, **extra: Any) -> JSONResponse:
    body: Dict[str, Any] = {"message": message, "type": etype or code, "param": param, "code": code}
    body.update(extra)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class ReplicaFailed(Exception):
    """A replica died or became unreachable while running a request."""

    def __init__(self, replica_id: str, cause: BaseException):
        super().__init__(f"replica {replica_id} failed while running the request: {type(cause).__name__}: {cause}")
        self.replica_id = replica_id


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, code: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: Any, model: str, model_name: str, prefix_chars: int = 1024,
                 max_attempts: int = 3, app_name: str = "afo", replica_deployment: str = "AfoReplica"):
        self.replicas = replicas
        self.model = model
        self.model_name = model_name
        self.prefix_chars = prefix_chars
        self.max_attempts = max(1, max_attempts)
        self.app_name = app_name
        self.replica_deployment = replica_deployment
        self.created = int(time.time())
        self.actor_to_replica: Dict[str, str] = {}
        self.retries = 0
        self.failed = 0

    # ---- request parsing -------------------------------------------------------------

    def _check_model(self, body: Dict[str, Any]) -> None:
        model = body.get("model")
        if model not in (None, "auto", self.model_name, self.model):
            raise BadRequest(f"the model `{model}` does not exist or is not served here", "model",
                             "model_not_found", 404)

    def _common(self, body: Dict[str, Any], default_max_tokens: int) -> Dict[str, Any]:
        if body.get("n", 1) != 1:
            raise BadRequest("n: only 1 is supported", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        req = {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "seed": body.get("seed"),
            "stop": body.get("stop"),
            "stream": bool(body.get("stream", False)),
        }
        for name in ("max_tokens",):
            if not isinstance(req[name], int) or req[name] < 1:
                raise BadRequest(f"{name}: expected a positive integer", name)
        return req

    def _chat_request(self, body: Dict[str, Any]) -> Dict[str, Any]:
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: expected a non-empty list", "messages")
        plain: List[Dict[str, str]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}]: expected an object with a role", "messages")
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise BadRequest(f"messages[{i}]: only text content parts are served here", "messages")
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content: expected a string", "messages")
            plain.append({"role": m["role"], "content": content})
        req = self._common(body, 256)
        req["messages"] = plain
        req["route_key"] = route_key(plain, None, self.prefix_chars)
        return req

    def _completion_request(self, body: Dict[str, Any]) -> Dict[str, Any]:
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt: expected a string (or a list of one)", "prompt")
        req = self._common(body, 16)
        req["prompt"] = prompt
        req["route_key"] = route_key(None, prompt, self.prefix_chars)
        return req

    # ---- running on a replica ----------------------------------------------------------

    def _replica_of(self, e: BaseException, replica_id: Optional[str]) -> str:
        if replica_id:
            return replica_id
        actor_id = getattr(e, "actor_id", None)
        if actor_id:
            return self.actor_to_replica.get(actor_id, f"actor {actor_id}")
        rid = getattr(e, "_replica_id", None)
        return str(rid) if rid else "unknown"

    async def _open(self, req: Dict[str, Any]) -> Tuple[Dict[str, Any], Any, List[Dict[str, Any]]]:
        """Starts the request on a replica and reads up to its first output (a delta,
        the result, or an error), retrying on another replica while nothing has been
        produced. Returns (start event, the event generator, events read)."""
        last: Optional[ReplicaFailed] = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.retries += 1
                await asyncio.sleep(0.2 * attempt)
            gen = self.replicas.options(stream=True).run.remote(req)
            start: Dict[str, Any] = {}
            try:
                start = await gen.__anext__()
                self.actor_to_replica[start.get("actor_id", "")] = start["replica_id"]
                first = await gen.__anext__()
                return start, gen, [first]
            except StopAsyncIteration:
                raise RuntimeError("replica ended the request without a result") from None
            except REPLICA_FAILURES as e:
                last = ReplicaFailed(self._replica_of(e, start.get("replica_id")), e)
                logger.warning("%s (attempt %d of %d)", last, attempt + 1, self.max_attempts)
        assert last is not None
        raise last

    async def _events(self, req: Dict[str, Any]) -> Tuple[Dict[str, Any], AsyncIterator[Dict[str, Any]]]:
        start, gen, read = await self._open(req)
        replica_id = start["replica_id"]

        async def events() -> AsyncIterator[Dict[str, Any]]:
            finished = False
            try:
                for ev in read:
                    yield ev
                while True:
                    try:
                        ev = await gen.__anext__()
                    except StopAsyncIteration:
                        finished = True
                        return
                    except REPLICA_FAILURES as e:
                        finished = True
                        raise ReplicaFailed(replica_id, e) from e
                    yield ev
            finally:
                if not finished:  # the client went away: cancel the run on the replica
                    gen.cancel()

        return start, events()

    async def _whole(self, req: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """A non-streamed request: its one output is the result (or an error), so
        `_open` retries it as a whole while it has not returned."""
        start, gen, read = await self._open(req)
        ev = read[0]
        if ev["event"] not in ("result", "error"):
            gen.cancel()
            raise RuntimeError(f"replica {start['replica_id']} sent {ev['event']!r} for a non-streamed request")
        return start, ev

    def _failure(self, e: BaseException) -> JSONResponse:
        if isinstance(e, BadRequest):
            return error_response(e.status, e.code, str(e), "invalid_request_error", e.param)
        if isinstance(e, ReplicaFailed):
            self.failed += 1
            return error_response(503, "replica_unavailable", str(e), "server_error", replica_id=e.replica_id)
        logger.exception("request failed")
        return error_response(500, "internal_error", f"{type(e).__name__}: {e}", "server_error")

    @staticmethod
    def _runtime_error(ev: Dict[str, Any]) -> JSONResponse:
        etype = "invalid_request_error" if ev["status"] < 500 else "server_error"
        return error_response(ev["status"], ev["code"], ev["message"], etype, replica_id=ev.get("replica_id"))

    # ---- OpenAI shapes ----------------------------------------------------------------

    @staticmethod
    def _usage(result: Dict[str, Any]) -> Dict[str, int]:
        u = result["usage"]
        return {k: int(u[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}

    def _afo_fields(self, start: Dict[str, Any], result: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        out = {"replica_id": start["replica_id"], "node_id": start["node_id"]}
        if result is not None:
            out["afo"] = {k: result.get(k) for k in ("run_id", "badge", "timings", "prefix_cache_hit_tokens",
                                                    "peak_memory_bytes", "cutline_bytes")}
        return out

    async def _respond(self, body: Dict[str, Any], chat: bool):
        try:
            req = self._chat_request(body) if chat else self._completion_request(body)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            if not req["stream"]:
                start, ev = await self._whole(req)
                if ev["event"] == "error":
                    return self._runtime_error(ev)
                result = ev["result"]
                choice: Dict[str, Any] = {"index": 0, "finish_reason": result["finish_reason"]}
                if chat:
                    choice["message"] = {"role": "assistant", "content": result["text"]}
                else:
                    choice.update(text=result["text"], logprobs=None)
                return JSONResponse({
                    "id": rid, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": self.model_name, "choices": [choice],
                    "usage": self._usage(result), **self._afo_fields(start, result),
                })
            start, events = await self._events(req)
            first: List[Dict[str, Any]] = []
            async for ev in events:  # the first output is already read: no wait here
                first.append(ev)
                break
            if first and first[0]["event"] == "error":
                await events.aclose()
                return self._runtime_error(first[0])
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._failure(e)
        return StreamingResponse(self._sse(start, first, events, rid, created, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(self, start, first, events, rid: str, created: int, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        ids = self._afo_fields(start)

        def chunk(delta: Optional[Dict[str, Any]] = None, text: Optional[str] = None,
                  finish: Optional[str] = None, **extra: Any) -> str:
            if chat:
                choices = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
            c = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                 "choices": choices, **ids, **extra}
            if include_usage and "usage" not in c:
                c["usage"] = None
            return _sse(c)

        async def all_events():
            for ev in first:
                yield ev
            async for ev in events:
                yield ev

        sent_role = False
        try:
            async for ev in all_events():
                kind = ev["event"]
                if kind == "delta":
                    if chat and not sent_role:
                        sent_role = True
                        yield chunk({"role": "assistant", "content": ""})
                    yield chunk({"content": ev["text"]}, text=ev["text"])
                elif kind == "result":
                    result = ev["result"]
                    if chat and not sent_role:
                        yield chunk({"role": "assistant", "content": ""})
                    yield chunk({}, finish=result["finish_reason"], afo=self._afo_fields(start, result)["afo"])
                    if include_usage:
                        c = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                             "choices": [], "usage": self._usage(result), **ids}
                        yield _sse(c)
                    break
                elif kind == "error":
                    yield _sse({"error": {"message": ev["message"], "type": "server_error", "code": ev["code"],
                                          "param": None, "replica_id": ev.get("replica_id")}})
                    break
        except ReplicaFailed as e:
            self.failed += 1
            yield _sse({"error": {"message": str(e), "type": "server_error", "code": "replica_unavailable",
                                  "param": None, "replica_id": e.replica_id}})
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    # ---- routes -----------------------------------------------------------------------

    async def _json(self, request: Request) -> Dict[str, Any]:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            body = await self._json(request)
        except BadRequest as e:
            return self._failure(e)
        return await self._respond(body, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            body = await self._json(request)
        except BadRequest as e:
            return self._failure(e)
        return await self._respond(body, chat=False)

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "afo"},
            {"id": "auto", "object": "model", "created": self.created, "owned_by": "afo"},
        ]}

    def _replica_ids(self) -> List[str]:
        prefix = f"{REPLICA_ACTOR_PREFIX}{self.app_name}#{self.replica_deployment}#"
        ids = []
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"] if isinstance(actor, dict) else actor
            if name.startswith(prefix):
                ids.append(name[len(prefix):])
        return sorted(ids)

    async def _replica_health(self, uid: str) -> Dict[str, Any]:
        resp = self.replicas.options(stream=False).health.remote({"target_replica": uid})
        try:
            h = await asyncio.wait_for(resp, timeout=3.0)
            if h.get("replica_id") != uid:
                # The router sends a probe for a replica that is not live to another.
                return {"status": "unreachable", "replica_id": uid,
                        "error": f"not among the live replicas (replica {h.get('replica_id')} answered)"}
            self.actor_to_replica[h.get("actor_id", "")] = uid
            return {"status": "ok", **h}
        except Exception as e:  # noqa: BLE001 - reported per replica
            resp.cancel()
            return {"status": "unreachable", "replica_id": uid, "error": f"{type(e).__name__}: {e}".strip()}

    @api.get("/health")
    async def health(self):
        ids = await asyncio.to_thread(self._replica_ids)
        # One probe at a time: handle calls made while serving one HTTP request share its
        # internal request id, and the router hands a chosen replica to the pending
        # call with that id, so concurrent probes could swap their targets.
        replicas = [await self._replica_health(uid) for uid in ids]
        badges = [r["runtime"].get("badge") for r in replicas if r["status"] == "ok" and "runtime" in r]
        order = {"SAFE": 0, "WARN": 1, "OVER_CUTLINE": 2}
        worst = max(badges, key=lambda b: order.get(b, 3)) if badges else None
        healthy = sum(1 for r in replicas if r["status"] == "ok")
        status = "ok" if replicas and healthy == len(replicas) else ("degraded" if healthy else "unavailable")
        body = {"status": status, "model": self.model_name, "replicas_healthy": healthy,
                "replicas_total": len(replicas), "badge": worst, "retried_requests": self.retries,
                "failed_requests": self.failed, "replicas": replicas}
        return JSONResponse(body, status_code=200 if healthy else 503)
