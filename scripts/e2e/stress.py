#!/usr/bin/env python3
"""A bounded memory-safety stress test of `afo serve` (Python standard library only).

Starts `afo --threads 2 serve --model M1 --model M2 ... --lazy --cutline C --log
runs.jsonl --port 0`, samples the server's resident memory (VmRSS and VmHWM of
/proc/PID/status) every 10 ms for the whole run, and sends a seeded burst of traffic
over loopback: CLIENTS threads each send REQUESTS chat completions spread over the
served models (long prompts cut from the GPL-3 text asking for a summary, streaming and
not, some clients closing the socket after the first chunk or two; image requests and
client-side chains, an image analysis then a summary of it by a text model, when a
vision-language model is served). Then it waits until /health shows nothing running or
waiting, records the steady-state RSS, times how long a short request takes to
succeed, stops the server with SIGTERM and counts the SSOT lines of its log.

It fails (exit 1, unless --no-fail) on:
  - a breach: the peak RSS (sampled, or the kernel's VmHWM) above the cutline;
  - SSOT lines in the log != requests sent (every request must leave one line);
  - the short request after the burst not succeeding within 5 s;
  - the server crashing (or never becoming idle, or not stopping on SIGTERM).
Exit 2 is a usage or setup error (the server did not start, a file is missing).

The summary is human-readable lines, then one JSON object on the last line.
Every loop is bounded: an overall deadline for the burst, a timeout per request, and
fixed limits for the idle wait, the probe and the shutdown.

Usage: stress.py --afo BIN --model PATH [--model PATH ...] [options]   (see --help)
"""

import argparse
import base64
import collections
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from harness import MIB, busy, describe_exit, mib, model_id, parse_bytes
import urllib.error
import urllib.request

PROBE_GOAL_S = 5.0       # the short request after the burst must succeed within this
PROBE_LIMIT_S = 20.0     # ... and is retried for at most this long (to report the time)
PROBE_PAUSE_S = 0.25     # between two tries (each try is a request that needs an SSOT line)
IDLE_LIMIT_S = 120.0     # the longest wait for /health to show nothing running
SHUTDOWN_LIMIT_S = 60.0  # the longest wait for a graceful stop after SIGTERM
START_LIMIT_S = 120.0    # the longest wait for "listening on"
SAMPLE_PERIOD_S = 0.010  # RSS sampling period
VLM_PROMPT_CHARS = 1500  # the tiny VLM's tokenizer is byte-level, 4,096 positions
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def log(msg):
    print(f"[stress {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- server


class Server:
    """`afo serve` as a child process, its output in serve.log."""

    def __init__(self, afo, models, cutline, log_path, out_dir, threads, extra):
        self.log_path = log_path
        self.serve_log = os.path.join(out_dir, "serve.log")
        cmd = [afo, "--threads", str(threads), "serve"]
        for m in models:
            cmd += ["--model", m]
        cmd += ["--lazy", "--cutline", cutline, "--log", log_path, "--port", "0"] + extra
        self.cmd = cmd
        self.out = open(self.serve_log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.addr = None
        self.exit_code = None   # set once the process is reaped
        self.stopped_by_us = False

    def wait_listening(self):
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            m = re.search(rb"listening on http://([0-9.]+):([0-9]+)", self.read_log())
            if m:
                self.addr = (m.group(1).decode(), int(m.group(2)))
                return True
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                return False
            time.sleep(0.05)
        return False

    def read_log(self):
        try:
            with open(self.serve_log, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def tail(self, lines=25):
        return "\n".join(self.read_log().decode(errors="replace").splitlines()[-lines:])

    def alive(self):
        if self.proc.poll() is None:
            return True
        self.exit_code = self.proc.returncode
        return False

    def stop(self):
        """SIGTERM, then SIGKILL after SHUTDOWN_LIMIT_S. Returns True on a clean stop."""
        if not self.alive():
            return False
        self.stopped_by_us = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=SHUTDOWN_LIMIT_S)
            return self.exit_code == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
            return False
        finally:
            self.out.close()


# --------------------------------------------------------------------------- RSS


class RssSampler(threading.Thread):
    """Reads VmRSS and VmHWM of /proc/PID/status every 10 ms until stopped."""

    def __init__(self, pid):
        super().__init__(daemon=True, name="rss-sampler")
        self.path = f"/proc/{pid}/status"
        self.samples = []       # (monotonic time, rss bytes)
        self.hwm = 0
        self.peak = 0
        self.peak_t = None
        self.gone = False
        self.halt = threading.Event()

    def read(self):
        """(VmRSS, VmHWM) in bytes, or None when the process is gone or a zombie."""
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError:
            return None
        rss = re.search(rb"VmRSS:\s+([0-9]+) kB", text)
        hwm = re.search(rb"VmHWM:\s+([0-9]+) kB", text)
        if not rss:
            return None
        return int(rss.group(1)) * 1024, int(hwm.group(1)) * 1024 if hwm else 0

    def run(self):
        next_t = time.monotonic()
        while not self.halt.is_set():
            v = self.read()
            now = time.monotonic()
            if v is None:
                self.gone = True
                return
            rss, hwm = v
            self.samples.append((now, rss))
            self.hwm = max(self.hwm, hwm)
            if rss > self.peak:
                self.peak, self.peak_t = rss, now
            next_t += SAMPLE_PERIOD_S
            delay = next_t - time.monotonic()
            if delay > 0:
                self.halt.wait(delay)
            else:
                next_t = time.monotonic()   # fell behind: do not burst to catch up

    def current(self):
        return self.samples[-1][1] if self.samples else None

    def max_between(self, t0, t1):
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else None

    def settle(self, limit_s=5.0, window_s=1.0, tolerance=1 * MIB):
        """Waits (at most limit_s) until RSS varies less than `tolerance` over
        `window_s`; returns the median of that window (the steady-state RSS)."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            window = [r for t, r in self.samples if t >= now - window_s]
            if now - start >= window_s and window and max(window) - min(window) < tolerance:
                break
            if now - start >= limit_s or self.gone:
                break
            time.sleep(0.1)
        window = sorted(r for t, r in self.samples if t >= time.monotonic() - window_s)
        return window[len(window) // 2] if window else self.current()


# --------------------------------------------------------------------------- HTTP


def get_json(addr, path, timeout=5.0):
    url = f"http://{addr[0]}:{addr[1]}{path}"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


class Result:
    """What happened to one HTTP request."""

    __slots__ = ("client", "index", "kind", "model", "stream", "prompt_chars", "max_tokens",
                 "sent", "status", "outcome", "error", "latency_s", "ttft_s", "events", "text",
                 "started")

    def __init__(self, **kw):
        self.sent = False
        self.status = None
        self.outcome = None
        self.error = None
        self.latency_s = None
        self.ttft_s = None
        self.events = 0
        self.text = ""
        self.started = None
        for k, v in kw.items():
            setattr(self, k, v)

    def row(self):
        return {k: getattr(self, k) for k in self.__slots__ if k != "text"}


def post_chat(addr, body, result, timeout_s, disconnect_after=None):
    """POSTs one chat completion and fills `result`. Every read is bounded by
    `timeout_s` from the start (socket timeout plus a wall-clock check per event).

    Outcomes: ok, disconnected (closed by us on purpose after `disconnect_after` SSE
    events), http_error (status != 200), stream_error (an error event), truncated (the
    stream or body ended early), bad_response, timeout, transport_error."""
    start = time.monotonic()
    result.started = start
    deadline = start + timeout_s
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout_s)
    payload = json.dumps(body).encode()
    try:
        try:
            conn.request("POST", "/v1/chat/completions", body=payload,
                         headers={"Content-Type": "application/json"})
            result.sent = True
            sock = conn.sock
            resp = conn.getresponse()
            result.status = resp.status
            if resp.status != 200:
                raw = resp.read()
                try:
                    err = json.loads(raw)["error"]
                    result.error = f"{err.get('code') or err.get('type')}: {err.get('message', '')[:160]}"
                except (ValueError, KeyError, TypeError):
                    result.error = raw[:160].decode(errors="replace")
                result.outcome = "http_error"
                return
            if not body.get("stream"):
                obj = json.loads(resp.read())
                msg = obj["choices"][0]["message"]["content"]
                result.text = msg or ""
                result.outcome = "ok"
                return
            # Server-sent events: `data: {json}` lines, `data: [DONE]` at the end.
            while True:
                if time.monotonic() > deadline:
                    result.outcome = "timeout"
                    result.error = f"stream not finished after {timeout_s:.0f} s"
                    return
                line = resp.readline()
                if not line:
                    result.outcome = "truncated"
                    result.error = "the stream ended without [DONE]"
                    return
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.outcome = "ok"
                    return
                result.events += 1
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    result.outcome = "stream_error"
                    result.error = f"{err.get('code') or err.get('type')}: {err.get('message', '')[:160]}"
                    return
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if result.ttft_s is None:
                            result.ttft_s = time.monotonic() - start
                        result.text += piece
                if disconnect_after is not None and result.events >= disconnect_after:
                    # Hang up mid-stream: the server must cancel the request.
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    result.outcome = "disconnected"
                    return
        except socket.timeout:
            result.outcome = "timeout"
            result.error = f"no answer within {timeout_s:.0f} s"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            result.outcome = "bad_response"
            result.error = f"{type(e).__name__}: {e}"[:200]
        except (OSError, http.client.HTTPException) as e:
            result.outcome = "transport_error"
            result.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        result.latency_s = time.monotonic() - start
        conn.close()


# --------------------------------------------------------------------------- plan


def data_url(path):
    ext = os.path.splitext(path)[1].lower()
    media = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
             ".webp": "image/webp", ".gif": "image/gif"}.get(ext)
    if media is None:
        raise SystemExit(f"stress: {path}: not a PNG, JPEG, WebP or GIF file")
    with open(path, "rb") as f:
        return f"data:{media};base64,{base64.b64encode(f.read()).decode()}"


class Plan:
    """The seeded traffic: per client, a list of steps. A step is one request, or a
    chain (an image analysis by the VLM, then a summary of its text by a text model)."""

    def __init__(self, args, models, vlm_ids, corpus, images):
        self.steps = []
        text_ids = [m for m in models if m not in vlm_ids]
        lo, hi = args.prompt_chars
        tlo, thi = args.max_tokens
        # About a quarter of the clients hang up mid-stream (at least one when there
        # are two or more clients); the choice is seeded like the rest.
        pick = random.Random(f"{args.seed}:disconnectors")
        n_disc = max(1 if args.clients >= 2 else 0, round(args.clients * args.disconnect_fraction))
        disconnectors = set(pick.sample(range(args.clients), min(n_disc, args.clients)))
        self.disconnectors = sorted(disconnectors)
        # Models: each served model gets its share of the steps (every one is hit when
        # there are at least as many steps as models), in a seeded random order.
        total = args.clients * args.requests
        assigned = [models[i % len(models)] for i in range(total)]
        random.Random(f"{args.seed}:models").shuffle(assigned)
        vlm_steps = 0
        for c in range(args.clients):
            rng = random.Random(f"{args.seed}:client:{c}")
            steps = []
            for k in range(args.requests):
                model = assigned[c * args.requests + k]
                is_vlm = model in vlm_ids
                kind = "chat"
                if is_vlm:
                    # The first two VLM steps are an image request and a chain (so that
                    # a short run covers both), the others drawn.
                    r = [0.5, 0.1][vlm_steps] if vlm_steps < 2 else rng.random()
                    kind = "chain" if r < 0.3 and text_ids else ("image" if r < 0.85 else "chat")
                    vlm_steps += 1
                chars = rng.randint(lo, hi)
                if is_vlm:
                    chars = min(chars, VLM_PROMPT_CHARS)
                start = rng.randrange(0, max(1, len(corpus) - chars))
                excerpt = corpus[start:start + chars]
                step = {
                    "client": c, "index": k, "kind": kind, "model": model,
                    "max_tokens": rng.randint(tlo, thi), "seed": rng.randrange(1 << 31),
                    "temperature": rng.choice([0.0, 0.7]), "prompt_chars": chars,
                }
                if c in disconnectors:
                    step["stream"] = True
                    # 1 event: the role chunk only (the request may still be queued);
                    # 2-3: after the first text delta(s), mid-generation.
                    step["disconnect_after"] = rng.choice([1, 2, 3]) if rng.random() < 0.8 else None
                else:
                    step["stream"] = rng.random() < 0.5
                    step["disconnect_after"] = None
                if kind == "chain":
                    step["stream"] = False          # the analysis is read whole
                    step["disconnect_after"] = None
                    step["summary_model"] = rng.choice(text_ids)
                    step["summary_stream"] = rng.random() < 0.5
                    step["summary_max_tokens"] = rng.randint(tlo, thi)
                if kind in ("image", "chain"):
                    n_img = 2 if rng.random() < 0.2 else 1
                    step["images"] = [rng.randrange(len(images)) for _ in range(n_img)]
                    step["text"] = ("Describe the image in detail, then relate it to this text:\n\n"
                                    + excerpt)
                else:
                    step["text"] = ("Summarize the following text in two or three sentences:\n\n"
                                    + excerpt)
                step["start_delay_s"] = rng.uniform(0, 0.5) if k == 0 else 0.0
                steps.append(step)
            self.steps.append(steps)


def chat_body(model, content, max_tokens, stream, seed, temperature, include_usage=False):
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream, "seed": seed,
            "temperature": temperature}
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


class Burst:
    """Runs the plan: one thread per client, each step in turn, within the deadline."""

    def __init__(self, addr, plan, images, args):
        self.addr, self.plan, self.images, self.args = addr, plan, images, args
        self.results = []
        self.lock = threading.Lock()
        self.skipped = 0            # steps not started because the deadline passed
        self.deadline = None

    def record(self, r):
        with self.lock:
            self.results.append(r)

    def timeout(self):
        """Per-request timeout: the configured one, cut to the overall deadline
        (plus a little grace so that a request started just before it can answer)."""
        left = self.deadline - time.monotonic()
        return max(5.0, min(self.args.request_timeout, left + 10.0))

    def client(self, steps):
        for step in steps:
            if step["start_delay_s"]:
                time.sleep(step["start_delay_s"])
            if time.monotonic() >= self.deadline:
                with self.lock:
                    self.skipped += len(steps) - steps.index(step)
                return
            content = step["text"]
            if step["kind"] in ("image", "chain"):
                content = [{"type": "text", "text": step["text"]}] + [
                    {"type": "image_url", "image_url": {"url": self.images[i][1]}}
                    for i in step["images"]]
            body = chat_body(step["model"], content, step["max_tokens"], step["stream"],
                             step["seed"], step["temperature"],
                             include_usage=step["seed"] % 2 == 0)
            kind = {"chat": "stream" if step["stream"] else "chat"}.get(step["kind"], step["kind"])
            if step["kind"] == "chain":
                kind = "chain-analysis"
            if step["disconnect_after"] is not None:
                kind += "-disconnect"
            r = Result(client=step["client"], index=step["index"], kind=kind,
                       model=step["model"], stream=step["stream"],
                       prompt_chars=step["prompt_chars"], max_tokens=step["max_tokens"])
            post_chat(self.addr, body, r, self.timeout(), step["disconnect_after"])
            self.record(r)
            if step["kind"] == "chain" and r.outcome == "ok" and time.monotonic() < self.deadline:
                # The second stage of the chain: a text model summarises the analysis.
                analysis = r.text.strip() or "(the analysis was empty)"
                text = ("Summarize this image description in one sentence:\n\n"
                        + analysis[:4000])
                body = chat_body(step["summary_model"], text, step["summary_max_tokens"],
                                 step["summary_stream"], step["seed"], step["temperature"])
                s = Result(client=step["client"], index=step["index"], kind="chain-summary",
                           model=step["summary_model"], stream=step["summary_stream"],
                           prompt_chars=len(text), max_tokens=step["summary_max_tokens"])
                post_chat(self.addr, body, s, self.timeout())
                self.record(s)

    def run(self):
        self.deadline = time.monotonic() + self.args.deadline
        threads = [threading.Thread(target=self.client, args=(steps,), daemon=True,
                                    name=f"client-{i}")
                   for i, steps in enumerate(self.plan.steps)]
        for t in threads:
            t.start()
        # Every request is bounded by self.timeout(), so this join is bounded too.
        hard_stop = self.deadline + self.args.request_timeout + 30
        for t in threads:
            t.join(max(0.0, hard_stop - time.monotonic()))
        return sum(t.is_alive() for t in threads)


# --------------------------------------------------------------------------- phases


def health_watch(addr, server, stop, stats):
    """Polls /health once a second during the burst: the server's own view."""
    while not stop.wait(1.0):
        if not server.alive():
            return
        try:
            h = get_json(addr, "/health", timeout=2.0)
        except (OSError, ValueError):
            stats["health_errors"] += 1
            continue
        mem = h.get("memory", {})
        stats["max_resident_reported"] = max(stats["max_resident_reported"], mem.get("resident_bytes", 0))
        stats["max_reserved"] = max(stats["max_reserved"], mem.get("reserved_bytes", 0))
        stats["badges"][h.get("badge", "?")] += 1


def wait_idle(addr, server):
    """Polls /health until no model has a request running or waiting. Returns
    (seconds waited or None if never idle, the last /health body)."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < IDLE_LIMIT_S:
        if not server.alive():
            return None, last
        try:
            last = get_json(addr, "/health", timeout=5.0)
            if busy(last) == 0:
                return time.monotonic() - start, last
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None, last


def probe(addr, model, server, results):
    """Sends a short request until one succeeds (at most PROBE_LIMIT_S); returns the
    seconds from the first try to the success, or None."""
    start = time.monotonic()
    attempt = 0
    while time.monotonic() - start < PROBE_LIMIT_S and server.alive():
        attempt += 1
        r = Result(client=-1, index=attempt, kind="probe", model=model, stream=False,
                   prompt_chars=0, max_tokens=4)
        body = chat_body(model, "Say hello.", 4, False, 1, 0.0)
        r.prompt_chars = len("Say hello.")
        post_chat(addr, body, r, max(1.0, min(30.0, PROBE_LIMIT_S - (time.monotonic() - start))))
        results.append(r)
        if r.outcome == "ok":
            return time.monotonic() - start
        time.sleep(PROBE_PAUSE_S)
    return None


def count_ssot(path):
    """(lines, records by status, unparsable lines) of the JSONL log."""
    lines, bad = 0, 0
    by_status = collections.Counter()
    try:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                lines += 1
                try:
                    by_status[str(json.loads(raw).get("status", "?"))] += 1
                except ValueError:
                    bad += 1
    except FileNotFoundError:
        pass
    return lines, dict(by_status), bad


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Memory-safety stress test of `afo serve` (see the module docstring).")
    p.add_argument("--afo", required=True, help="the afo binary")
    p.add_argument("--model", dest="models", action="append", required=True,
                   help="a model to serve (GGUF file or folder); repeat")
    p.add_argument("--cutline", default="700MiB", help="memory cutline (default 700MiB)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (12; --short 4)")
    p.add_argument("--requests", type=int, default=None, help="requests per client (4; --short 2)")
    p.add_argument("--short", action="store_true",
                   help="quick CI form: 4 clients x 2 requests, shorter prompts, about a minute")
    p.add_argument("--no-fail", action="store_true", help="only report: exit 0 whatever happens")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no new request starts (600; --short 90)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds one request may take (300; --short 60)")
    p.add_argument("--threads", type=int, default=2, help="afo --threads (2)")
    p.add_argument("--out", default=os.path.join(ROOT, "target", "stress", "run"),
                   help="folder for runs.jsonl, serve.log, rss.csv, requests.jsonl")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3",
                   help="the text prompts are cut from")
    p.add_argument("--image", dest="images", action="append",
                   help="an image for image requests (repeat; default: the shipped sample "
                        "JPEG and a PNG fixture)")
    p.add_argument("--probe-model", help="model of the short request after the burst "
                                         "(default: the first text model)")
    p.add_argument("--disconnect-fraction", type=float, default=0.25,
                   help="fraction of clients that hang up mid-stream (0.25)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="an extra `afo serve` argument (repeat), e.g. --serve-arg=--max-batch=4")
    args = p.parse_args(argv)
    if args.short:
        args.clients = args.clients or 4
        args.requests = args.requests or 2
        args.deadline = args.deadline or 90.0
        args.request_timeout = args.request_timeout or 60.0
        args.prompt_chars = (500, 1500)
        args.max_tokens = (16, 24)
    else:
        args.clients = args.clients or 12
        args.requests = args.requests or 4
        args.deadline = args.deadline or 600.0
        args.request_timeout = args.request_timeout or 300.0
        args.prompt_chars = (500, 8000)
        args.max_tokens = (16, 48)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be at least 1")
    args.cutline_bytes = parse_bytes(args.cutline)
    args.images = args.images or [os.path.join(ROOT, "crates/cli/assets/sample.jpg"),
                                  os.path.join(ROOT, "crates/image/tests/fixtures/images/grey.png")]
    return args


def main(argv):
    args = parse_args(argv)
    for f in [args.afo, args.text] + args.models + args.images:
        if not os.path.exists(f):
            print(f"stress: {f} does not exist", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    ssot_log = os.path.join(args.out, "runs.jsonl")
    for stale in ("runs.jsonl", "serve.log", "rss.csv", "requests.jsonl"):
        try:
            os.remove(os.path.join(args.out, stale))
        except FileNotFoundError:
            pass
    with open(args.text, encoding="utf-8", errors="replace") as f:
        corpus = " ".join(f.read().split())     # one line of text: cuts land anywhere
    images = [(p, data_url(p)) for p in args.images]

    server = Server(args.afo, args.models, args.cutline, ssot_log, args.out, args.threads,
                    args.serve_arg)
    log(f"started: {' '.join(server.cmd)} (pid {server.pid})")
    sampler = RssSampler(server.pid)
    sampler.start()
    try:
        if not server.wait_listening():
            print(f"stress: afo serve did not start ({describe_exit(server.exit_code)}):\n"
                  f"{server.tail()}", file=sys.stderr)
            return 2
        return run(args, server, sampler, corpus, images, ssot_log)
    finally:
        if server.alive():      # an exception or an early return: do not leave it behind
            server.stop()
        server.out.close()
        sampler.halt.set()


def run(args, server, sampler, corpus, images, ssot_log):
    addr = server.addr
    failures = []
    log(f"listening on {addr[0]}:{addr[1]}")

    models = get_json(addr, "/v1/models")
    served = [m["id"] for m in models.get("data", []) if m["id"] != "auto"]
    health = get_json(addr, "/health")
    cutline = health["memory"]["cutline_bytes"]
    if cutline != args.cutline_bytes:
        log(f"note: the server reads --cutline {args.cutline} as {cutline} bytes "
            f"(we read {args.cutline_bytes}); using the server's")
    # A folder served as a model is a vision-language model (GGUF files are text).
    vlm_ids = {model_id(p) for p in args.models if os.path.isdir(p)} & set(served)
    text_ids = [m for m in served if m not in vlm_ids]
    if not text_ids:
        print("stress: no text model is served", file=sys.stderr)
        return 2
    probe_model = args.probe_model or text_ids[0]

    plan = Plan(args, served, vlm_ids, corpus, images)
    n_planned = sum(len(s) for s in plan.steps)
    time.sleep(0.5)
    rss_before = sampler.settle(limit_s=3.0, window_s=0.5)
    log(f"models {served} (vlm: {sorted(vlm_ids) or 'none'}); rss before the burst "
        f"{mib(rss_before)}; {args.clients} clients x {args.requests} requests "
        f"(seed {args.seed}, disconnecting clients {plan.disconnectors})")

    # ---- the burst, with /health watched once a second
    stats = {"max_resident_reported": 0, "max_reserved": 0, "health_errors": 0,
             "badges": collections.Counter()}
    stop_watch = threading.Event()
    watcher = threading.Thread(target=health_watch, args=(addr, server, stop_watch, stats),
                               daemon=True)
    watcher.start()
    burst = Burst(addr, plan, images, args)
    t_burst = time.monotonic()
    stuck = burst.run()
    t_burst_end = time.monotonic()
    stop_watch.set()
    watcher.join(5)
    burst_s = t_burst_end - t_burst
    log(f"burst done in {burst_s:.1f} s: {len(burst.results)} requests, "
        f"{burst.skipped} steps skipped at the deadline")
    if stuck:
        failures.append(f"{stuck} client threads still running past the hard stop")

    # ---- after the burst: idle, steady state, the short request
    idle_s = steady = time_to_success = None
    idle_health = None
    ssot_after_burst = None
    probes = []
    if server.alive():
        idle_s, idle_health = wait_idle(addr, server)
        if idle_s is None and server.alive():
            failures.append(f"the server never became idle within {IDLE_LIMIT_S:.0f} s "
                            f"(/health: {busy(idle_health or {})} running or waiting)")
        if server.alive():
            # The burst's records, before the probe adds its own (informative: the check
            # is on the final count after a graceful stop).
            ssot_after_burst = count_ssot(ssot_log)[0]
            steady = sampler.settle()
            log(f"idle after {idle_s if idle_s is None else round(idle_s, 2)} s; "
                f"steady-state rss {mib(steady)}; probing {probe_model}")
            time_to_success = probe(addr, probe_model, server, probes)
    crashed = not server.alive()
    crash_detail = describe_exit(server.exit_code) if crashed else None

    # ---- stop (graceful: workers write their records), then count the SSOT lines
    clean_stop = None
    if not crashed:
        clean_stop = server.stop()
        if not clean_stop:
            failures.append(f"afo serve did not stop cleanly on SIGTERM "
                            f"({describe_exit(server.exit_code)})")
    sampler.halt.set()
    sampler.join(2)
    ssot_lines, ssot_status, ssot_bad = count_ssot(ssot_log)

    # ---- tallies
    results = burst.results + probes
    sent = sum(r.sent for r in results)
    burst_sent = sum(r.sent for r in burst.results)
    status_counts = collections.Counter(str(r.status) if r.status else "none" for r in results)
    outcomes = collections.Counter(r.outcome for r in results)
    refused = sum(1 for r in results if r.status and r.status != 200)
    by_kind = collections.Counter(r.kind for r in results)
    errors = collections.Counter(r.error.split(":")[0] for r in results if r.error)
    peak_burst = sampler.max_between(t_burst, t_burst_end)
    peak = max(sampler.peak, sampler.hwm)
    peak_at = None if sampler.peak_t is None else round(sampler.peak_t - t_burst, 2)
    by_model = collections.defaultdict(collections.Counter)
    for r in results:
        by_model[r.model][str(r.status) if r.status else r.outcome] += 1
    breach = peak > cutline

    if breach:
        failures.append(f"BREACH: peak RSS {mib(peak)} > cutline {mib(cutline)} "
                        f"({peak / cutline:.3f}x)")
    if ssot_lines != sent:
        failures.append(f"SSOT: {ssot_lines} lines in {ssot_log} for {sent} requests sent "
                        f"({ssot_lines - sent:+d})")
    if ssot_bad:
        failures.append(f"SSOT: {ssot_bad} lines are not JSON")
    if crashed:
        failures.append(f"CRASH: afo serve died ({crash_detail}); its last lines:\n{server.tail()}")
    elif time_to_success is None:
        failures.append(f"the short request after the burst never succeeded "
                        f"(tried {len(probes)} times for {PROBE_LIMIT_S:.0f} s)")
    elif time_to_success > PROBE_GOAL_S:
        failures.append(f"the short request after the burst took {time_to_success:.2f} s "
                        f"to succeed (goal < {PROBE_GOAL_S:.0f} s)")

    # ---- artefacts: the RSS trace and every request
    with open(os.path.join(args.out, "rss.csv"), "w") as f:
        f.write("t_s,rss_bytes\n")
        t0 = sampler.samples[0][0] if sampler.samples else 0
        for t, r in sampler.samples:
            f.write(f"{t - t0:.3f},{r}\n")
    with open(os.path.join(args.out, "requests.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r.row()) + "\n")

    # ---- summary
    gaps = [b[0] - a[0] for a, b in zip(sampler.samples, sampler.samples[1:])]
    summary = {
        "ok": not failures,
        "seed": args.seed, "short": args.short, "clients": args.clients,
        "requests_per_client": args.requests, "models": served, "vlm": sorted(vlm_ids),
        "cutline_bytes": cutline,
        "peak_rss_bytes": peak, "peak_rss_sampled_bytes": sampler.peak,
        "peak_rss_hwm_bytes": sampler.hwm, "peak_rss_burst_bytes": peak_burst,
        "peak_over_cutline": round(peak / cutline, 4), "breach": breach,
        "peak_rss_sampled_at_s": peak_at,
        "by_model": {m: dict(c) for m, c in by_model.items()},
        "rss_before_bytes": rss_before, "rss_steady_bytes": steady,
        "rss_samples": len(sampler.samples),
        "rss_sample_gap_max_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "server_reported_max_resident_bytes": stats["max_resident_reported"],
        "server_reported_max_reserved_bytes": stats["max_reserved"],
        "server_badges": dict(stats["badges"]),
        "idle_reserved_bytes": (idle_health or {}).get("memory", {}).get("reserved_bytes"),
        "burst_s": round(burst_s, 2), "idle_after_s": None if idle_s is None else round(idle_s, 2),
        "planned_steps": n_planned, "skipped_steps": burst.skipped,
        "requests_sent": sent, "burst_requests_sent": burst_sent, "probe_requests_sent": len(probes),
        "http_status": dict(status_counts), "outcomes": dict(outcomes), "kinds": dict(by_kind),
        "errors": dict(errors), "refused_non_200": refused,
        "client_disconnects": outcomes.get("disconnected", 0),
        "ssot_lines": ssot_lines, "ssot_by_status": ssot_status,
        "ssot_lines_after_burst": ssot_after_burst,
        "ssot_missing": sent - ssot_lines,
        "time_to_success_s": None if time_to_success is None else round(time_to_success, 3),
        "probe_model": probe_model, "probe_attempts": len(probes),
        "crashed": crashed, "crash": crash_detail, "clean_stop": clean_stop,
        "failures": [f.splitlines()[0] for f in failures],
        "out": args.out,
    }
    print(f"afo serve stress: seed {args.seed}, {args.clients} clients x {args.requests} "
          f"requests{' (short)' if args.short else ''}, models {', '.join(served)}")
    print(f"  cutline          {mib(cutline)}")
    print(f"  peak RSS         {mib(peak)} = {peak / cutline:.3f} x cutline "
          f"(sampled {mib(sampler.peak)} in {len(sampler.samples)} samples, max gap "
          f"{summary['rss_sample_gap_max_ms']} ms, at {'-' if peak_at is None else f'{peak_at:+.2f}'} s "
          f"from the burst start; "
          f"VmHWM {mib(sampler.hwm)}; during the burst {mib(peak_burst)})")
    print(f"  breach           {'YES' if breach else 'no'}")
    print(f"  RSS before/after {mib(rss_before)} before the burst, {mib(steady)} steady after "
          f"(server's own max resident {mib(stats['max_resident_reported'])}, max reserved "
          f"{mib(stats['max_reserved'])}, reserved when idle "
          f"{mib(summary['idle_reserved_bytes'])}; badges {dict(stats['badges'])})")
    print(f"  burst            {burst_s:.1f} s, {burst_sent} requests sent for {n_planned} steps "
          f"planned (a chain is two; {burst.skipped} skipped at the deadline); idle "
          f"{'never' if idle_s is None else f'{idle_s:.2f} s'} after it")
    print(f"  requests         {sent} sent (with {len(probes)} probes); HTTP status (none: no answer) "
          f"{dict(sorted(status_counts.items()))}; outcomes {dict(sorted(outcomes.items()))}")
    print(f"  by kind          {dict(sorted(by_kind.items()))}")
    for m in sorted(by_model):
        print(f"  model {m:<30} {dict(sorted(by_model[m].items()))}")
    if errors:
        print(f"  errors           {dict(errors.most_common())}")
    print(f"  client hang-ups  {outcomes.get('disconnected', 0)} (clients {plan.disconnectors})")
    print(f"  SSOT lines       {ssot_lines} for {sent} requests sent ({ssot_lines - sent:+d}); "
          f"by status {ssot_status}; {refused} requests answered non-200"
          + ("" if ssot_after_burst is None else
             f"; {ssot_after_burst} lines at idle after the burst for its {burst_sent} requests"))
    tts = (f"succeeded after {time_to_success:.2f} s" if time_to_success is not None
           else f"did not succeed within {PROBE_LIMIT_S:.0f} s" if probes
           else "was not tried (the server was down)")
    print(f"  after the burst  a short request to {probe_model} {tts} "
          f"({len(probes)} attempts; goal < {PROBE_GOAL_S:.0f} s)")
    if crashed:
        print(f"  server           CRASHED ({crash_detail})")
    else:
        stop = ("stopped cleanly on SIGTERM" if clean_stop
                else "SIGTERM: " + describe_exit(server.exit_code))
        print(f"  server           alive after the run; {stop}")
    print(f"  artefacts        {args.out}/{{runs.jsonl,serve.log,rss.csv,requests.jsonl}}")
    if failures:
        print("FAIL" + (" (reported only: --no-fail)" if args.no_fail else "") + ":")
        for f in failures:
            print("  - " + f.replace("\n", "\n    "))
    else:
        print("PASS")
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=True))
    return 0 if (not failures or args.no_fail) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
