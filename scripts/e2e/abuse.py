#!/usr/bin/env python3
"""A bounded, loopback-only abuse test of `afo serve` (Python standard library only).

Starts `afo --threads 2 serve --model SmolLM2 --host 127.0.0.1 --port 0 --cutline C
--log runs.jsonl --api-key K --header-timeout 2 --idle-timeout 2 --max-connections 512
--shutdown-grace 5 --queue-timeout 20 --public-metrics` and runs one phase per attack:

  0 setup       /metrics without a key (public), a chat without a key (401, no record),
                and a calibration of the prefill speed (sizes the prompts of 5 and 7);
  1 slowloris   N connections (200; --short 40) sending a request head 1 byte a second:
                the server must close each within --header-timeout + 2 s;
  2 idle flood  M connections (140; --short 40) that send nothing: closed within
                max(--header-timeout, --idle-timeout) + 2 s;
  3 fd limit    a second server under `ulimit -n 128` and 140 idle connections: /health
                keeps answering (200, or 503 while at the connection cap), the connections
                over the cap get 503 with a JSON body, the rest are closed in time, and a
                chat succeeds afterwards;
  4 10 MB       two concurrent chats whose user message is 10 MB of text: a fast 400 that
                names the limit;
  5 disconnect  a streamed chat with a ~3,000-token prompt; the client hangs up 1 s after
                sending; the server must be idle within 1 s (+ one prefill chunk) of it;
  6 stop        a chat with four 3 MB stop strings: a fast 400 naming `stop`;
  7 timeout     a third server with --timeout 3 and a prompt whose prefill takes about
                twice that: the 504 must come at ~3 s, not after the prefill;
  8 crash       kill -9 of the main server with streams in flight, the SSOT log's last
                line checked (torn or whole), a restart on the same --log, 3 requests:
                every line must parse except at most one torn line that is not the last,
                and the 3 new records must be whole. When the kill left no torn line, a
                torn tail (half of the last record, no newline) is appended before the
                restart, so that the recovery from one is always exercised.

In every phase a monitor polls GET /health every 50 ms on a fresh connection (the
phase passes only when the slowest answer took < 100 ms), the server's RSS is read from
/proc/PID/status every 20 ms (the phase's peak must stay under the cutline; VmHWM is
checked at the end), every complete request must get an HTTP answer, and the SSOT log
must grow by one record per complete request that reached a handler (401s write none).

All traffic goes to 127.0.0.1; every server is started here and killed at exit; every
wait is bounded, and the run has an overall deadline (a watchdog kills everything 20 s
past it). Prints a table, writes OUT/summary.json. Exit 0: every phase passed; 1: a
phase failed (or was skipped at the deadline); 2: a setup error (a server did not start).

Usage: abuse.py --afo BIN --model GGUF [--short] [options]   (see --help)
"""

import argparse
import collections
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from harness import busy, describe_exit, mib, model_id, parse_bytes

HOST = "127.0.0.1"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
API_KEY = "abuse-test-key-0123456789"

HEALTH_PERIOD_S = 0.050    # /health poll period during a phase
HEALTH_TIMEOUT_S = 2.0     # one /health probe gives up after this
HEALTH_GOAL_S = 0.100      # the slowest /health answer of a phase must be faster
RSS_PERIOD_S = 0.020       # RSS sampling period
CLOSE_GRACE_S = 2.0        # a flood connection must be closed by its timeout + this
FAST_REJECT_S = 2.0        # a refused huge request must be answered within this
CANCEL_GOAL_S = 1.0        # idle again within this (+ one prefill chunk) of a hang-up
START_LIMIT_S = 60.0       # the longest wait for "listening on"
IDLE_LIMIT_S = 30.0        # the longest wait for /health to show nothing running
FD_LIMIT = 128             # RLIMIT_NOFILE of the server in phase 3
FD_FLOOD = 140             # idle connections opened against it
PREFILL_CHUNK = 512        # tokens per prefill chunk (afo_engine::PREFILL_CHUNK)
MAX_PROMPT_TOKENS = 7000   # the long prompts stay well inside the model's context
TEN_MB = 10_000_000
STOP_BYTES = 3_000_000
SERVE_TIMEOUT_S = 3        # --timeout of the server in phase 7

PARAGRAPH = (
    "The harbour town woke slowly on winter mornings. Fishing boats rocked against the "
    "stone quay while gulls argued over scraps, and the baker on the corner lit his ovens "
    "long before dawn so that the first loaves were ready when the ferry arrived. Children "
    "walked to school along the sea wall, counting the waves that broke over the rocks, and "
    "the old lighthouse keeper, retired now for many years, still climbed the hill each day "
    "to watch the weather roll in from the west. In the afternoons the market filled with "
    "traders selling nets, rope, apples and wool, and in the evenings the windows of the inn "
    "glowed warmly as people gathered to share the news of the day.")

LIVE = set()               # servers to kill at exit
LIVE_LOCK = threading.Lock()


def log(msg):
    print(f"[abuse {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ms(s):
    return "-" if s is None else f"{s * 1000:.1f}"


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


# --------------------------------------------------------------------------- RSS


class RssSampler(threading.Thread):
    """Reads VmRSS and VmHWM of /proc/PID/status every 20 ms until the process is gone."""

    def __init__(self, pid):
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.path = f"/proc/{pid}/status"
        self.samples = []       # (monotonic time, rss bytes)
        self.hwm = 0
        self.peak = 0
        self.halt = threading.Event()

    def read(self):
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError:
            return None
        rss = re.search(rb"VmRSS:\s+([0-9]+) kB", text)
        hwm = re.search(rb"VmHWM:\s+([0-9]+) kB", text)
        if not rss:
            return None     # gone, or a zombie
        return int(rss.group(1)) * 1024, int(hwm.group(1)) * 1024 if hwm else 0

    def run(self):
        next_t = time.monotonic()
        while not self.halt.is_set():
            v = self.read()
            if v is None:
                return
            self.samples.append((time.monotonic(), v[0]))
            self.hwm = max(self.hwm, v[1])
            self.peak = max(self.peak, v[0])
            next_t += RSS_PERIOD_S
            delay = next_t - time.monotonic()
            if delay > 0:
                self.halt.wait(delay)
            else:
                next_t = time.monotonic()

    def max_between(self, t0, t1):
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else None


# --------------------------------------------------------------------------- servers


class Server:
    """`afo serve` on 127.0.0.1, port 0, as a child process; its output in serve-NAME.log
    (appended to across restarts)."""

    def __init__(self, name, args, ssot_log, extra=(), nofile=None):
        self.name = name
        self.ssot_log = ssot_log
        self.serve_log = os.path.join(args.out, f"serve-{name}.log")
        self.nofile = nofile
        self.cmd = ([args.afo, "--threads", str(args.threads), "serve",
                     "--model", args.model, "--host", HOST, "--port", "0",
                     "--cutline", args.cutline, "--log", ssot_log, "--api-key", API_KEY,
                     "--header-timeout", str(args.header_timeout),
                     "--idle-timeout", str(args.idle_timeout),
                     "--max-connections", str(args.max_connections),
                     "--shutdown-grace", str(args.shutdown_grace),
                     "--queue-timeout", str(args.queue_timeout),
                     "--public-metrics"]
                    + list(extra) + list(args.serve_arg))
        self.samplers = []
        self.proc = None
        self.start()

    def start(self):
        self.out = open(self.serve_log, "ab")
        self.offset = self.out.tell()
        preexec = None
        if self.nofile:
            n = self.nofile
            preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # noqa: E731
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        self.pid = self.proc.pid
        self.addr = None
        self.sampler = RssSampler(self.pid)
        self.sampler.start()
        self.samplers.append(self.sampler)
        with LIVE_LOCK:
            LIVE.add(self)
        log(f"{self.name}: started pid {self.pid}"
            + (f" under ulimit -n {self.nofile}" if self.nofile else ""))

    def read_log(self):
        try:
            with open(self.serve_log, "rb") as f:
                f.seek(self.offset)
                return f.read()
        except OSError:
            return b""

    def tail(self, lines=15):
        return "\n".join(self.read_log().decode(errors="replace").splitlines()[-lines:])

    def wait_listening(self):
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            m = re.search(rb"listening on http://([0-9.]+):([0-9]+)", self.read_log())
            if m:
                self.addr = (m.group(1).decode(), int(m.group(2)))
                if self.addr[0] != HOST:
                    raise SystemExit(f"abuse: the server listens on {self.addr[0]}, not {HOST}")
                log(f"{self.name}: listening on {self.addr[0]}:{self.addr[1]}")
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def hwm(self):
        return max((s.hwm for s in self.samplers), default=0)

    def peak_between(self, t0, t1):
        vals = [v for v in (s.max_between(t0, t1) for s in self.samplers) if v is not None]
        return max(vals) if vals else None

    def rss_now(self):
        """The RSS read right now from the live instance(s), or None if none is alive."""
        vals = [v[0] for v in (s.read() for s in self.samplers) if v is not None]
        return max(vals) if vals else None

    def stop(self, grace):
        """SIGTERM, SIGKILL after `grace` s. Returns (clean, seconds, how it ended)."""
        if not self.alive():
            return False, 0.0, describe_exit(self.proc.returncode if self.proc else None)
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=grace)
            clean = code == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            clean = False
        self._done()
        return clean, time.monotonic() - t0, describe_exit(code)

    def kill9(self):
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._done()

    def _done(self):
        self.sampler.halt.set()
        self.sampler.join(1)
        self.out.close()
        with LIVE_LOCK:
            LIVE.discard(self)


def kill_all():
    with LIVE_LOCK:
        servers = list(LIVE)
    for s in servers:
        try:
            if s.alive():
                s.proc.kill()
                s.proc.wait(timeout=5)
        except Exception:   # noqa: BLE001 - best effort at exit
            pass


# --------------------------------------------------------------------------- HTTP


class Reply:
    """One request on its own connection (Connection: close)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.t1 = None
        self.sent = False       # the whole request went out
        self.status = None      # None: no HTTP answer
        self.headers = {}
        self.body = b""
        self.error = None

    @property
    def latency(self):
        return None if self.t1 is None else self.t1 - self.t0

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error_text(self):
        """`code/param: message` of an OpenAI-style error body, else the body's start."""
        obj = self.json()
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            e = obj["error"]
            return f"{e.get('code') or e.get('type')}/{e.get('param')}: {e.get('message', '')}"
        return self.body[:200].decode(errors="replace")


def request_head(addr, method, path, body_len=None, auth=True, extra=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nConnection: close\r\n"
    if auth:
        head += f"Authorization: Bearer {API_KEY}\r\n"
    if body_len is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {body_len}\r\n"
    return (head + extra + "\r\n").encode()


def dechunk(data):
    out, i = bytearray(), 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return bytes(out)
        try:
            n = int(data[i:j].split(b";")[0], 16)
        except ValueError:
            return bytes(out)
        if n == 0:
            return bytes(out)
        out += data[j + 2:j + 2 + n]
        i = j + 2 + n + 2


def read_response(sock, r, deadline):
    buf = bytearray()
    head_end, need = -1, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            r.error = r.error or "timeout: no whole answer in time"
            break
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            r.error = r.error or "timeout: no whole answer in time"
            break
        except OSError as e:
            r.error = r.error or f"recv: {e}"
            break
        if not data:
            break
        buf += data
        if head_end < 0:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                m = re.search(rb"(?im)^content-length:\s*([0-9]+)\s*$", bytes(buf[:head_end]))
                if m:
                    need = head_end + 4 + int(m.group(1))
        if need is not None and len(buf) >= need:
            break
    if head_end < 0:
        head_end = buf.find(b"\r\n\r\n")
    if head_end >= 0:
        lines = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] ([0-9]{3})", lines[0])
        if m:
            r.status = int(m.group(1))
            for line in lines[1:]:
                k, _, v = line.partition(":")
                r.headers[k.strip().lower()] = v.strip()
            body = bytes(buf[head_end + 4:])
            if "chunked" in r.headers.get("transfer-encoding", "").lower():
                body = dechunk(body)
            r.body = body
    elif buf:
        r.error = r.error or f"not HTTP: {bytes(buf[:60])!r}"


def http_request(addr, method, path, body=None, timeout=10.0, auth=True):
    """Sends one request on a fresh connection and reads the answer, all within
    `timeout`. A body that cannot be sent whole (the server answered early and closed)
    still has its answer read."""
    r = Reply()
    deadline = r.t0 + timeout
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        r.error = f"connect: {e}"
        r.t1 = time.monotonic()
        return r
    try:
        payload = b"" if body is None else body
        try:
            sock.sendall(request_head(addr, method, path,
                                      None if body is None else len(payload), auth))
            if payload:
                sock.sendall(payload)
            r.sent = True
        except OSError as e:
            r.error = f"send: {e}"
        read_response(sock, r, deadline)
        if r.status is not None and not r.sent:
            r.error = None      # answered before the body was read: fine
    finally:
        sock.close()
        r.t1 = time.monotonic()
    return r


def chat_body(content, max_tokens, stream=False, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream, "temperature": 0.0, "seed": 1}
    body.update(extra)
    return json.dumps(body).encode()


def chat(addr, content, max_tokens, timeout=60.0, auth=True, **extra):
    return http_request(addr, "POST", "/v1/chat/completions",
                        chat_body(content, max_tokens, **extra), timeout=timeout, auth=auth)


def health(addr, timeout=HEALTH_TIMEOUT_S):
    # With the key: the models' running and waiting counts are shown to it only.
    r = http_request(addr, "GET", "/health", timeout=timeout, auth=True)
    return r, (r.json() if r.status == 200 else None)


def wait_idle(addr, limit=IDLE_LIMIT_S, poll=0.05):
    """Seconds until /health shows nothing running or waiting, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        _, h = health(addr)
        if h is not None and busy(h) == 0:
            return time.monotonic() - t0
        time.sleep(poll)
    return None


class HealthMonitor(threading.Thread):
    """GET /health every 50 ms, each on a fresh connection: (start, latency, status, error)."""

    def __init__(self, addr):
        super().__init__(daemon=True, name="health-monitor")
        self.addr = addr
        self.samples = []
        self.halt = threading.Event()

    def run(self):
        next_t = time.monotonic()
        while not self.halt.is_set():
            r, _ = health(self.addr)
            self.samples.append((r.t0, r.latency, r.status, r.error))
            next_t += HEALTH_PERIOD_S
            delay = next_t - time.monotonic()
            if delay > 0:
                self.halt.wait(delay)
            else:
                next_t = time.monotonic()

    def stop(self):
        self.halt.set()
        self.join(HEALTH_TIMEOUT_S + 1)

    def stats(self):
        lat = [s[1] for s in self.samples]
        codes = collections.Counter(str(s[2]) if s[2] else "none" for s in self.samples)
        errors = collections.Counter((s[3] or "").split(":")[0] for s in self.samples
                                     if s[2] is None)
        return {"probes": len(lat), "p50_ms": round(pct(lat, 0.5) * 1000, 2) if lat else None,
                "p99_ms": round(pct(lat, 0.99) * 1000, 2) if lat else None,
                "max_ms": round(max(lat) * 1000, 2) if lat else None,
                "status": dict(codes), "errors": dict(errors)}


# --------------------------------------------------------------------------- SSOT


def scan_ssot(path):
    """The SSOT log line by line: records (lines that are JSON objects), bad line
    numbers (1-based), whether the file ends without a newline (torn tail), and the
    parsed records."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    lines = data.split(b"\n")
    torn_tail = bool(lines and lines[-1] != b"")
    if not torn_tail:
        lines = lines[:-1]
    records, bad = [], []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            records.append(obj)
        except ValueError:
            bad.append(i)
    return {"lines": len(lines), "records": records, "bad": bad, "torn_tail": torn_tail,
            "bytes": len(data), "last": lines[-1] if lines else b""}


def last_record(path):
    """The last record's status, error and token counts (what the phase left)."""
    recs = scan_ssot(path)["records"]
    if not recs:
        return None
    r = recs[-1]
    return {k: r.get(k) for k in ("status", "error", "latency_ms", "tokens_in", "tokens_out")}


WHOLE_FIELDS = ("schema_version", "ts", "run_id", "model_id", "status", "latency_ms")


def whole(rec):
    return all(k in rec for k in WHOLE_FIELDS)


# --------------------------------------------------------------------------- floods


class Conn:
    __slots__ = ("sock", "opened", "closed", "how", "got", "sent", "error")

    def __init__(self):
        self.sock = None
        self.opened = None
        self.closed = None      # monotonic time the server closed it
        self.how = None         # eof, reset, send_error
        self.got = b""          # what the server sent (first bytes)
        self.sent = 0
        self.error = None

    def status(self):
        m = re.match(rb"HTTP/1\.[01] ([0-9]{3})", self.got)
        return int(m.group(1)) if m else None

    def body_json(self):
        i = self.got.find(b"\r\n\r\n")
        if i < 0:
            return None
        body = self.got[i + 4:]
        if b"chunked" in self.got[:i].lower():
            body = dechunk(body)
        try:
            return json.loads(body)
        except ValueError:
            return None


class Flood:
    """N connections that send `drip` one byte a second (or nothing), watched with
    poll(): when the server closes one (EOF or reset) the time is recorded."""

    def __init__(self, addr, n, drip=None):
        self.addr, self.n, self.drip = addr, n, drip
        self.conns = []

    def open(self):
        for _ in range(self.n):
            c = Conn()
            c.opened = time.monotonic()
            try:
                c.sock = socket.create_connection(self.addr, timeout=2.0)
                c.sock.setblocking(False)
            except OSError as e:
                c.error = f"connect: {e}"
                c.closed, c.how = time.monotonic(), "connect_error"
            self.conns.append(c)
        return self

    def open_ones(self):
        return [c for c in self.conns if c.closed is None and c.sock is not None]

    def _closed(self, c, how):
        c.closed, c.how = time.monotonic(), how
        try:
            c.sock.close()
        except OSError:
            pass

    def run(self, duration, stop=None):
        """Watches (and drips) for `duration` s, or until every connection is closed."""
        end = time.monotonic() + duration
        poller = select.poll()
        by_fd = {}
        for c in self.open_ones():
            by_fd[c.sock.fileno()] = c
            poller.register(c.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        while by_fd and time.monotonic() < end and not (stop and stop.is_set()):
            for fd, _ in poller.poll(50):
                c = by_fd.get(fd)
                if c is None:
                    continue
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    poller.unregister(fd)
                    del by_fd[fd]
                    self._closed(c, "reset")
                    continue
                if data:
                    if len(c.got) < 4096:
                        c.got += data[:4096 - len(c.got)]
                    continue
                poller.unregister(fd)
                del by_fd[fd]
                self._closed(c, "eof")
            if self.drip:
                now = time.monotonic()
                for fd, c in list(by_fd.items()):
                    if c.sent < len(self.drip) and now >= c.opened + c.sent:
                        try:
                            c.sock.send(self.drip[c.sent:c.sent + 1])
                            c.sent += 1
                        except BlockingIOError:
                            pass
                        except OSError:
                            poller.unregister(fd)
                            del by_fd[fd]
                            self._closed(c, "send_error")

    def close_all(self):
        for c in self.open_ones():
            try:
                c.sock.close()
            except OSError:
                pass

    def summary(self, limit_s):
        in_time = [c for c in self.conns if c.how in ("eof", "reset", "send_error")
                   and c.closed - c.opened <= limit_s]
        late = [c for c in self.conns if c.how in ("eof", "reset", "send_error")
                and c.closed - c.opened > limit_s]
        still_open = [c for c in self.conns if c.closed is None]
        close_s = [c.closed - c.opened for c in self.conns if c.how in ("eof", "reset", "send_error")]
        return {
            "connections": len(self.conns),
            "closed_by_server_in_time": len(in_time),
            "closed_by_server_late": len(late),
            "still_open": len(still_open),
            "connect_errors": sum(1 for c in self.conns if c.how == "connect_error"),
            "close_how": dict(collections.Counter(c.how or "open" for c in self.conns)),
            "answers": dict(collections.Counter(str(c.status()) for c in self.conns if c.got)),
            "close_after_s_min": round(min(close_s), 3) if close_s else None,
            "close_after_s_max": round(max(close_s), 3) if close_s else None,
            "limit_s": limit_s,
        }


# --------------------------------------------------------------------------- phases


class Phase:
    def __init__(self, num, name, server):
        self.num, self.name, self.server = num, name, server
        self.checks = []        # (label, ok, detail)
        self.metrics = {}
        self.requests = []      # (label, Reply) whose answer is required
        self.expect_records = 0
        self.health = None
        self.peak_rss = None
        self.ssot_delta = None
        self.skipped = None
        self.monitor = None
        self.t0 = self.t1 = None
        self.records_before = 0
        self.allow_503_health = False

    def check(self, label, ok, detail=""):
        self.checks.append((label, bool(ok), detail))
        log(f"  [{self.num}] {'PASS' if ok else 'FAIL'} {label}: {detail}")

    @property
    def ok(self):
        return self.skipped is None and all(ok for _, ok, _ in self.checks)

    def require(self, label, reply):
        self.requests.append((label, reply))

    def begin(self):
        log(f"phase {self.num} {self.name}")
        s = self.server
        if wait_idle(s.addr) is None:
            log(f"  [{self.num}] note: the server was not idle at the start of the phase")
        self.records_before = len(scan_ssot(s.ssot_log)["records"])
        self.t0 = time.monotonic()
        self.monitor = HealthMonitor(s.addr)
        self.monitor.start()

    def end(self, ssot=True, idle=True):
        """Stops the monitor and runs the common checks: /health, RSS, answers, SSOT."""
        self.monitor.stop()
        self.t1 = time.monotonic()
        s, cut = self.server, CUTLINE
        if idle and s.alive():
            wait_idle(s.addr)
            time.sleep(0.2)     # the record of a run that just ended
        self.health = self.monitor.stats()
        answered = ("200", "503") if self.allow_503_health else ("200",)
        bad = sum(n for k, n in self.health["status"].items() if k not in answered)
        self.check("health", self.health["max_ms"] is not None
                   and self.health["max_ms"] < HEALTH_GOAL_S * 1000 and bad == 0,
                   f"{self.health['probes']} probes, p50/p99/max {self.health['p50_ms']}/"
                   f"{self.health['p99_ms']}/{self.health['max_ms']} ms, status "
                   f"{self.health['status']}{', errors ' + str(self.health['errors']) if self.health['errors'] else ''}")
        self.peak_rss = s.peak_between(self.t0, self.t1)
        if self.peak_rss is None:
            # A phase shorter than the sampling period (a request refused in 20 ms on a
            # fast machine) has no sample in its window: read the RSS at its end.
            self.peak_rss = s.rss_now()
        self.check("rss", self.peak_rss is not None and self.peak_rss < cut,
                   f"peak {mib(self.peak_rss)} vs cutline {mib(cut)}")
        unanswered = [label for label, r in self.requests if r.status is None]
        self.check("answers", not unanswered,
                   f"{len(self.requests) - len(unanswered)}/{len(self.requests)} complete "
                   f"requests answered" + (f"; none for {unanswered}" if unanswered else ""))
        if ssot:
            after = len(scan_ssot(s.ssot_log)["records"])
            self.ssot_delta = after - self.records_before
            self.check("ssot", self.ssot_delta == self.expect_records,
                       f"{self.ssot_delta:+d} records for {self.expect_records} requests")

    def row(self):
        return {"phase": self.num, "name": self.name, "ok": self.ok, "skipped": self.skipped,
                "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in self.checks],
                "health": self.health, "peak_rss_bytes": self.peak_rss,
                "ssot_delta": self.ssot_delta, "expected_records": self.expect_records,
                "requests": [{"label": label, "status": r.status, "latency_s":
                              None if r.latency is None else round(r.latency, 3),
                              "error": r.error or (r.error_text() if r.status and r.status >= 400
                                                   else None)}
                             for label, r in self.requests],
                "metrics": self.metrics}


def in_thread(fn, *a):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn(*a)), daemon=True)
    t.start()
    return t, box


def long_prompt(tokens, cal, tag):
    """About `tokens` tokens: the paragraph repeated, after a unique first line (so that
    no prefix cache makes the prefill short)."""
    reps = max(1, round((tokens - cal["overhead"]) / cal["tokens_per_rep"]))
    return (f"[{tag} {time.time_ns()}] Read these notes, then summarise them in one line.\n\n"
            + "\n".join([PARAGRAPH] * reps))


def phase_setup(p, cal):
    """0: /metrics is public, a missing key is a 401 without a record; the prefill speed."""
    addr = p.server.addr
    p.begin()
    m = http_request(addr, "GET", "/metrics", timeout=5, auth=False)
    p.check("public metrics", m.status == 200, f"GET /metrics without a key: {m.status}")
    noauth = chat(addr, "Say hello.", 2, timeout=10, auth=False)
    p.require("no key", noauth)
    p.check("no key", noauth.status == 401, f"chat without a key: {noauth.status} (no record)")
    # Calibration: a warm-up without the paragraph (its prompt tokens are the fixed
    # part), then the paragraph repeated: tokens per paragraph and prefill tokens/s.
    reps = 2 if ARGS.short else 8
    results = []
    for label, n in (("warm-up", 0), ("calibrate", reps)):
        text = f"[{label} {time.time_ns()}] Summarise:\n\n" + "\n".join([PARAGRAPH] * n)
        r = chat(addr, text, 1, timeout=120)
        p.require(label, r)
        p.expect_records += 1
        usage = (r.json() or {}).get("usage", {}) if r.status == 200 else {}
        results.append((n, usage.get("prompt_tokens"), r.latency, r.status))
    (_, t0, _, _), (n, t1, l1, st1) = results
    if t0 and t1 and t1 > t0 and st1 == 200:
        cal["tokens_per_rep"] = (t1 - t0) / n
        cal["overhead"] = float(t0)
        cal["rate"] = t1 / l1
        cal["measured"] = True
    p.check("calibration", cal["measured"],
            f"{cal['tokens_per_rep']:.0f} tokens per paragraph, prefill about "
            f"{cal['rate']:.0f} tokens/s ({'measured' if cal['measured'] else 'a guess: ' + str(results)})")
    p.metrics.update({"calibration": cal, "metrics_status": m.status, "no_key_status": noauth.status})
    p.end()


def canary(p, label, delay=0.0):
    """A short chat during the attack: must succeed and leave a record."""
    def go():
        if delay:
            time.sleep(delay)
        r = chat(p.server.addr, f"[{label}] Say hello.", ARGS.max_tokens, timeout=30)
        p.require(label, r)
        return r
    p.expect_records += 1
    return in_thread(go)


def phase_flood(p, n, drip, limit_s, duration_s):
    """1 and 2: connections the server must close by itself within `limit_s`."""
    p.begin()
    flood = Flood(p.server.addr, n, drip).open()
    t, box = canary(p, f"canary-{p.num}", delay=0.5)
    flood.run(duration_s)
    flood.close_all()
    t.join(35)
    r = box.get("r")
    p.check("canary", r is not None and r.status == 200,
            f"a chat during the attack: {r.status if r else 'no answer'}"
            f"{'' if r is None or r.latency is None else f' in {r.latency:.2f} s'}")
    s = flood.summary(limit_s)
    p.metrics["flood"] = s
    p.check("server closes", s["closed_by_server_in_time"] == n,
            f"{s['closed_by_server_in_time']}/{n} closed by the server within {limit_s:.0f} s "
            f"(late {s['closed_by_server_late']}, still open {s['still_open']}, connect errors "
            f"{s['connect_errors']}; close after {s['close_after_s_min']}..{s['close_after_s_max']} s; "
            f"answers {s['answers']})")
    p.end()


def phase_fd(p, args):
    """3: a server under ulimit -n 128 and 140 idle connections."""
    server = p.server
    if not server.wait_listening():
        p.check("start", False, f"did not start under ulimit -n {FD_LIMIT} "
                f"({describe_exit(server.proc.poll())}): {server.tail(5)}")
        return
    p.allow_503_health = True
    p.begin()
    limit_s = max(args.header_timeout, args.idle_timeout) + CLOSE_GRACE_S
    flood = Flood(server.addr, FD_FLOOD).open()
    flood.run(limit_s + 1.0)
    flood.close_all()
    s = flood.summary(limit_s)
    # Connections the server let go of before their idle timeout: the room it made
    # at its cap (which it keeps below the descriptor limit).
    early = [c for c in flood.conns if c.how in ("eof", "reset", "send_error")
             and c.closed - c.opened < args.idle_timeout - 0.2]
    refused = [c for c in flood.conns if c.status() == 503]
    json_503 = [c for c in refused if isinstance(c.body_json(), dict)]
    p.metrics["flood"] = s
    p.metrics["closed_early_for_room"] = len(early)
    p.check("server closes", s["closed_by_server_in_time"] == FD_FLOOD,
            f"{s['closed_by_server_in_time']}/{FD_FLOOD} answered 503 or closed by the server "
            f"within {limit_s:.0f} s (late {s['closed_by_server_late']}, still open "
            f"{s['still_open']}; answers {s['answers']})")
    want = FD_FLOOD - FD_LIMIT
    p.check("over the cap", len(early) + len(refused) >= want and len(json_503) == len(refused),
            f"{len(early)} idle connections closed early to make room, {len(refused)} answered "
            f"503 ({len(json_503)} with a JSON error body); at least {want} expected: "
            f"{FD_FLOOD} connections, {FD_LIMIT} descriptors")
    # Recovery: /health 200 and a chat, within 5 s of the flood's end.
    t0 = time.monotonic()
    h_ok = False
    while time.monotonic() - t0 < 5.0:
        r, h = health(server.addr)
        if h is not None:
            h_ok = True
            break
        time.sleep(0.1)
    r = chat(server.addr, "[fd-canary] Say hello.", ARGS.max_tokens, timeout=30)
    p.require("canary", r)
    if r.status is not None and r.status != 503:
        p.expect_records += 1
    p.check("recovery", h_ok and r.status == 200 and server.alive(),
            f"/health 200 {'yes' if h_ok else 'no'} within 5 s; then a chat: {r.status} "
            f"{'' if r.status == 200 else r.error or r.error_text()}; server "
            f"{'alive' if server.alive() else describe_exit(server.proc.poll())}")
    p.end()


def phase_big(p, label, body, n, expect, timeout):
    """4 and 6: requests with huge fields: a fast 400 whose error names `expect`."""
    p.begin()
    threads = []
    for i in range(n):
        threads.append(in_thread(http_request, p.server.addr, "POST", "/v1/chat/completions",
                                 body, timeout))
    for t, _ in threads:
        t.join(timeout + 5)
    replies = [box.get("r") for _, box in threads]
    for i, r in enumerate(replies):
        if r is None:
            continue
        p.require(f"{label}-{i + 1}", r)
        if r.sent:
            p.expect_records += 1
    details = []
    ok = True
    for r in replies:
        if r is None:
            ok = False
            details.append("no result")
            continue
        text = r.error_text() if r.status else r.error
        fast = r.latency is not None and r.latency < FAST_REJECT_S
        named = r.status == 400 and re.search(expect, text or "", re.I) is not None
        ok = ok and fast and named
        details.append(f"{r.status} in {r.latency:.2f} s: {(text or '')[:140]}")
    p.metrics["answers"] = details
    p.check("refused fast", ok, f"want 400 naming {expect!r} within {FAST_REJECT_S:.0f} s; got "
            + " | ".join(details))
    p.end()


def phase_disconnect(p, cal):
    """5: a streamed chat with a long prompt; the client hangs up 1 s after sending."""
    addr = p.server.addr
    # Meaningful: a server that does not cancel inside the prefill is idle only when
    # the prefill ends, which must come well after the goal (1 s + one chunk after the
    # hang-up, itself 1 s after sending): a prefill of 4 s + one chunk at least.
    # The short form's prompt still takes the 2 s of prefill the check below asks for
    # (a fixed 3,000 tokens did not once f16 KV caches made long prompts faster).
    short = cal["rate"] * 2.5 + PREFILL_CHUNK
    tokens = cal["rate"] * 4.0 + PREFILL_CHUNK
    tokens = int(min(MAX_PROMPT_TOKENS, max(3000, tokens)) if not ARGS.short
                 else min(MAX_PROMPT_TOKENS, max(600, short)))
    prefill_s = tokens / cal["rate"]
    chunk_s = PREFILL_CHUNK / cal["rate"]
    p.begin()
    body = chat_body(long_prompt(tokens, cal, "disconnect"), 64, stream=True)
    sock = socket.create_connection(addr, timeout=5)
    sock.sendall(request_head(addr, "POST", "/v1/chat/completions", len(body)) + body)
    t_sent = time.monotonic()
    got = b""
    while time.monotonic() < t_sent + 1.0:
        sock.settimeout(max(0.01, t_sent + 1.0 - time.monotonic()))
        try:
            data = sock.recv(65536)
            if not data:
                break
            got += data
        except socket.timeout:
            break
        except OSError:
            break
    _, h = health(addr)
    running = busy(h)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    t_disc = time.monotonic()
    p.expect_records += 1
    t_idle = None
    limit = prefill_s * 2 + 15
    while time.monotonic() - t_disc < limit:
        _, h = health(addr)
        if h is not None and busy(h) == 0:
            t_idle = time.monotonic()
            break
        time.sleep(0.02)
    idle_s = None if t_idle is None else t_idle - t_disc
    content_seen = b'"content":"' in got and b'"content":""' not in got
    p.metrics.update({"prompt_tokens_est": tokens, "prefill_est_s": round(prefill_s, 2),
                      "chunk_est_s": round(chunk_s, 3), "running_at_disconnect": running,
                      "idle_after_disconnect_s": None if idle_s is None else round(idle_s, 3),
                      "bytes_before_disconnect": len(got)})
    p.check("in prefill", running >= 1 and prefill_s > 2.0,
            f"{running} running at the hang-up; prompt ~{tokens} tokens, prefill ~{prefill_s:.1f} s")
    p.check("cancelled", idle_s is not None and idle_s < CANCEL_GOAL_S + chunk_s,
            f"idle {'never' if idle_s is None else f'{idle_s:.2f} s'} after the hang-up "
            f"(goal < {CANCEL_GOAL_S:.0f} s + one chunk {chunk_s:.2f} s; the prefill alone "
            f"~{prefill_s:.1f} s){'; it had streamed text' if content_seen else ''}")
    p.end()
    p.metrics["record"] = last_record(p.server.ssot_log)


def phase_timeout(p, cal):
    """7: --timeout 3 and a prompt whose prefill takes about twice as long."""
    server = p.server
    if not server.wait_listening():
        p.check("start", False, f"the --timeout {SERVE_TIMEOUT_S} server did not start "
                f"({describe_exit(server.proc.poll())}): {server.tail(5)}")
        return
    # Meaningful: without a cancellation inside the prefill, the 504 would come when the
    # prefill ends, which must be well after the goal (timeout + 1 s + one chunk).
    want = cal["rate"] * (2 * SERVE_TIMEOUT_S) + PREFILL_CHUNK
    tokens = int(min(MAX_PROMPT_TOKENS, max(3000, want)) if not ARGS.short
                 else min(3000, max(600, want)))
    prefill_s = tokens / cal["rate"]
    chunk_s = PREFILL_CHUNK / cal["rate"]
    p.begin()
    r = chat(server.addr, long_prompt(tokens, cal, "timeout"), 64,
             timeout=prefill_s * 2 + 30)
    p.require("timeout", r)
    if r.sent:
        p.expect_records += 1
    p.metrics.update({"prompt_tokens_est": tokens, "prefill_est_s": round(prefill_s, 2),
                      "time_to_answer_s": None if r.latency is None else round(r.latency, 3),
                      "status": r.status})
    goal = SERVE_TIMEOUT_S + 1.0 + chunk_s
    p.check("504 in time", r.status == 504 and r.latency < goal,
            f"{r.status} after {r.latency:.2f} s (goal 504 within {goal:.1f} s: --timeout "
            f"{SERVE_TIMEOUT_S} + 1 s + one chunk; the prefill alone ~{prefill_s:.1f} s"
            f"{'' if prefill_s > goal + 1 else ', too short to tell: not meaningful'})"
            f"{'' if r.status == 504 else ': ' + (r.error or r.error_text())[:120]}")
    p.end()
    p.metrics["record"] = last_record(server.ssot_log)


def stream_until_cut(addr, body, t_limit, out):
    """A streamed chat read until the server goes away (or `t_limit`)."""
    res = {"sent": False, "bytes": 0, "content": False, "end": None}
    out.append(res)
    try:
        sock = socket.create_connection(addr, timeout=5)
        sock.sendall(request_head(addr, "POST", "/v1/chat/completions", len(body)) + body)
        res["sent"] = True
        while time.monotonic() < t_limit:
            sock.settimeout(max(0.01, t_limit - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                res["end"] = "eof"
                break
            res["bytes"] += len(data)
            if re.search(rb'"content":"[^"]', data):
                res["content"] = True
        else:
            res["end"] = "timeout"
        sock.close()
    except socket.timeout:
        res["end"] = "timeout"
    except OSError as e:
        res["end"] = f"error: {e}"


def phase_crash(p, args, cal):
    """8: kill -9 with streams in flight, restart on the same --log, 3 requests."""
    server = p.server
    addr = server.addr
    p.begin()
    n_streams = 4 if args.short else 8
    streams, threads = [], []
    stop_writers = threading.Event()
    t_limit = time.monotonic() + 120
    for i in range(n_streams):
        body = chat_body(long_prompt(150 if args.short else 400, cal, f"crash-{i}"),
                         32 if args.short else 128, stream=True)
        t = threading.Thread(target=stream_until_cut, args=(addr, body, t_limit, streams),
                             daemon=True)
        t.start()
        threads.append(t)

    def writer():
        # Short requests in a loop: records are being appended when the kill lands.
        while not stop_writers.is_set():
            chat(addr, "Say hi.", 1, timeout=10)
    writers = [threading.Thread(target=writer, daemon=True) for _ in range(2)]
    for w in writers:
        w.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < (8 if args.short else 15):
        if any(s["content"] for s in streams):
            break
        time.sleep(0.05)
    in_flight = sum(1 for s in streams if s["sent"] and s["end"] is None)
    p.monitor.stop()        # no probes into the gap between the kill and the restart
    server.kill9()
    t_kill = time.monotonic()
    stop_writers.set()
    for t in threads + writers:
        t.join(12)
    at_kill = scan_ssot(server.ssot_log)
    last_whole = not at_kill["torn_tail"] and not (at_kill["bad"] and at_kill["bad"][-1] == at_kill["lines"])
    torn = "none"
    if at_kill["torn_tail"]:
        torn = f"real ({len(at_kill['last'])} bytes without a newline)"
    elif at_kill["records"] and not args.no_torn_tail:
        # Simulate the torn write the kill did not leave: half of the last record.
        last = at_kill["last"]
        with open(server.ssot_log, "ab") as f:
            f.write(last[:max(1, len(last) // 2)])
        torn = f"simulated ({max(1, len(last) // 2)} bytes appended without a newline)"
    p.metrics.update({"streams": n_streams, "in_flight_at_kill": in_flight,
                      "streams_with_text": sum(1 for s in streams if s["content"]),
                      "stream_ends": dict(collections.Counter(str(s["end"]).split(":")[0]
                                                              for s in streams)),
                      "records_at_kill": len(at_kill["records"]),
                      "last_line_whole_at_kill": last_whole, "torn_tail": torn})
    p.check("kill -9", in_flight >= 1,
            f"{in_flight}/{n_streams} streams in flight at the kill "
            f"({p.metrics['streams_with_text']} had text); last line at the kill "
            f"{'whole' if last_whole else 'torn'}; torn tail: {torn}")
    before = scan_ssot(server.ssot_log)
    # The restart, on the same log.
    server.start()
    if not server.wait_listening():
        p.check("restart", False, f"did not restart ({describe_exit(server.proc.poll())}): "
                f"{server.tail(5)}")
        p.health = p.monitor.stats()
        return
    addr = server.addr
    t_up = time.monotonic()
    p.metrics["restart_s"] = round(t_up - t_kill, 2)
    p.check("restart", True, f"listening again {t_up - t_kill:.2f} s after the kill")
    first = p.monitor.samples
    p.monitor = HealthMonitor(addr)
    p.monitor.samples = list(first)
    p.monitor.start()
    for i in range(3):
        r = chat(addr, f"[after-restart {i}] Say hello.", args.max_tokens, timeout=60)
        p.require(f"after-restart-{i + 1}", r)
        p.expect_records += 1
    p.records_before = len(before["records"])
    p.end()
    after = scan_ssot(server.ssot_log)
    new = after["records"][len(before["records"]):]
    bad_last = bool(after["bad"]) and after["bad"][-1] == after["lines"]
    p.check("log parses", len(after["bad"]) <= 1 and not bad_last and not after["torn_tail"],
            f"{after['lines']} lines, unparsable {after['bad'] or 'none'} "
            f"(at most one, not the last){'; ends without a newline' if after['torn_tail'] else ''}")
    tail_ok = (len(new) == 3 and all(whole(r) for r in new)
               and after["lines"] >= 3 and after["bad"][-1:] != [after["lines"]]
               and len({r.get("run_id") for r in new}) == 3)
    p.check("new records whole", tail_ok,
            f"{len(new)} new records, whole: {sum(1 for r in new if whole(r))} "
            f"(statuses {[r.get('status') for r in new]})")


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description="Bounded abuse test of `afo serve` "
                                            "(see the module docstring).")
    p.add_argument("--afo", required=True, help="the afo binary")
    p.add_argument("--model", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--cutline", default="2GiB", help="memory cutline (2GiB)")
    p.add_argument("--short", action="store_true", help="the CI form (< 2 minutes)")
    p.add_argument("--phases", default="0,1,2,3,4,5,6,7,8",
                   help="comma-separated phases to run (0 always runs: it calibrates)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of the short requests (32; --short 8)")
    p.add_argument("--deadline", type=float, default=None,
                   help="overall deadline in seconds (900; --short 110)")
    p.add_argument("--header-timeout", type=int, default=2, help="afo serve --header-timeout (2)")
    p.add_argument("--idle-timeout", type=int, default=2, help="afo serve --idle-timeout (2)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="afo serve --max-connections (512)")
    p.add_argument("--shutdown-grace", type=int, default=5, help="afo serve --shutdown-grace (5)")
    p.add_argument("--queue-timeout", type=int, default=20, help="afo serve --queue-timeout (20)")
    p.add_argument("--threads", type=int, default=2, help="afo --threads (2)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="an extra `afo serve` argument (repeat)")
    p.add_argument("--no-torn-tail", action="store_true",
                   help="phase 8: do not append a torn tail when the kill left none")
    p.add_argument("--no-fail", action="store_true", help="report only: exit 0")
    p.add_argument("--out", default=os.path.join(ROOT, "target", "abuse"),
                   help="folder for summary.json, the SSOT and server logs (target/abuse)")
    a = p.parse_args(argv)
    a.max_tokens = a.max_tokens or (8 if a.short else 32)
    a.deadline = a.deadline or (110.0 if a.short else 900.0)
    a.slowloris = 40 if a.short else 200
    a.idle_flood = 40 if a.short else 140
    a.cutline_bytes = parse_bytes(a.cutline)
    try:
        a.phase_set = {int(x) for x in a.phases.split(",") if x.strip()} | {0}
    except ValueError:
        p.error(f"--phases {a.phases!r}: give numbers 0-8, e.g. 1,2,8")
    return a


ARGS = None
MODEL = None
CUTLINE = None


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv):
    global ARGS, MODEL, CUTLINE
    args = ARGS = parse_args(argv)
    MODEL = model_id(args.model)
    CUTLINE = args.cutline_bytes
    for f in (args.afo, args.model):
        if not os.path.exists(f):
            print(f"abuse: {f} does not exist", file=sys.stderr)
            return 2
    raise_nofile()
    os.makedirs(args.out, exist_ok=True)
    for stale in os.listdir(args.out):
        if stale.endswith((".jsonl", ".log")) or stale == "summary.json":
            os.remove(os.path.join(args.out, stale))
    start = time.monotonic()
    deadline = start + args.deadline

    def watchdog():
        log(f"the overall deadline ({args.deadline:.0f} s) passed 20 s ago: killing the servers")
        kill_all()
        os._exit(1)
    dog = threading.Timer(args.deadline + 20, watchdog)
    dog.daemon = True
    dog.start()
    try:
        return run(args, start, deadline)
    finally:
        dog.cancel()
        kill_all()


def run(args, start, deadline):
    phases = []
    main_log = os.path.join(args.out, "runs.jsonl")
    main = Server("main", args, main_log)
    if not main.wait_listening():
        why = f"afo serve did not start ({describe_exit(main.proc.poll())}):\n{main.tail()}"
        print(f"abuse: {why}", file=sys.stderr)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"ok": False, "setup_error": why, "command": main.cmd}, f, indent=1)
        return 2
    cal = {"rate": 200.0, "tokens_per_rep": 140.0, "overhead": 40.0, "measured": False}
    header_limit = args.header_timeout + CLOSE_GRACE_S
    idle_limit = max(args.header_timeout, args.idle_timeout) + CLOSE_GRACE_S
    # Each phase: (number, name, minimum seconds it needs, body).
    plan = [
        (0, "setup", 5, lambda p: phase_setup(p, cal)),
        (1, "slowloris", header_limit + 3,
         lambda p: phase_flood(p, args.slowloris, SLOW_HEAD, header_limit, header_limit + 1.0)),
        (2, "idle flood", idle_limit + 3,
         lambda p: phase_flood(p, args.idle_flood, None, idle_limit, idle_limit + 1.0)),
        (3, "fd limit 128", idle_limit + 8, lambda p: phase_fd(p, args)),
        (4, "10 MB prompts", 5, lambda p: phase_big(
            p, "10MB", chat_body(ten_mb_text(), args.max_tokens), 2,
            r"limit|at most|maximum|too (long|large)|exceed", 60 if not args.short else 30)),
        (5, "disconnect in prefill", 8, lambda p: phase_disconnect(p, cal)),
        (6, "huge stop strings", 3, lambda p: phase_big(
            p, "stop", chat_body("Say hello.", args.max_tokens,
                                 stop=[c * STOP_BYTES for c in "wxyz"]),
            1, r"stop", 60 if not args.short else 30)),
        (7, "timeout in prefill", 10, lambda p: phase_timeout(p, cal)),
        (8, "kill -9 and restart", 10, lambda p: phase_crash(p, args, cal)),
    ]
    for num, name, need, body in plan:
        if num not in args.phase_set:
            continue
        server = main
        if num == 3:
            server = Server("fd", args, os.path.join(args.out, "runs-fd.jsonl"), nofile=FD_LIMIT)
        elif num == 7:
            server = Server("timeout", args, os.path.join(args.out, "runs-timeout.jsonl"),
                            extra=["--timeout", str(SERVE_TIMEOUT_S)])
        p = Phase(num, name, server)
        phases.append(p)
        if time.monotonic() + need > deadline:
            p.skipped = f"skipped: {deadline - time.monotonic():.0f} s left before the deadline"
            log(f"phase {num} {name}: {p.skipped}")
        elif not main.alive():
            p.skipped = f"skipped: the main server is down ({describe_exit(main.proc.poll())})"
            log(f"phase {num} {name}: {p.skipped}")
        else:
            try:
                body(p)
            except Exception as e:      # noqa: BLE001 - one phase's bug must not hide the rest
                p.check("ran", False, f"{type(e).__name__}: {e}")
                if p.monitor is not None:
                    p.monitor.stop()
        if server is not main:
            clean, secs, how = server.stop(args.shutdown_grace + 5)
            p.metrics["stop"] = {"clean": clean, "seconds": round(secs, 2), "how": how,
                                 "vm_hwm_bytes": server.hwm()}
            if server.hwm() >= CUTLINE:
                p.check("hwm", False, f"VmHWM {mib(server.hwm())} >= cutline {mib(CUTLINE)}")
        if not main.alive() and num != 8:
            p.check("main alive", False, f"the main server died: {describe_exit(main.proc.poll())}"
                    f"\n{main.tail(8)}")

    # The end: VmHWM of every instance, a graceful stop of the main server.
    final = Phase(9, "end", main)
    hwm = main.hwm()
    final.check("vm_hwm", hwm < CUTLINE, f"VmHWM {mib(hwm)} (main server, every instance) vs "
                f"cutline {mib(CUTLINE)}")
    if main.alive():
        clean, secs, how = main.stop(args.shutdown_grace + 5)
        final.check("shutdown", clean, f"SIGTERM: {how} after {secs:.2f} s "
                    f"(--shutdown-grace {args.shutdown_grace})")
    else:
        final.check("shutdown", False, f"the main server was already down "
                    f"({describe_exit(main.proc.poll())})")
    phases.append(final)
    elapsed = time.monotonic() - start
    report(args, phases, elapsed)
    failed = [p for p in phases if not p.ok]
    return 0 if (not failed or args.no_fail) else 1


SLOW_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
             b"Content-Type: application/json\r\nContent-Length: 64\r\n"
             b"X-Slow: " + b"a" * 200 + b"\r\n\r\n")


def ten_mb_text():
    words = (PARAGRAPH + " ") * (TEN_MB // (len(PARAGRAPH) + 1) + 1)
    return words[:TEN_MB]


def report(args, phases, elapsed):
    print(f"afo serve abuse test{' (short)' if args.short else ''}: {elapsed:.0f} s, cutline "
          f"{mib(CUTLINE)}, --header-timeout {args.header_timeout} --idle-timeout "
          f"{args.idle_timeout}")
    head = f"{'phase':<24} {'result':<6} {'/health p50/p99/max ms':<24} {'peak RSS':>11} " \
           f"{'answers':>8} {'SSOT':>7}  detail"
    print(head)
    print("-" * len(head))
    for p in phases:
        h = p.health or {}
        hl = (f"{h.get('p50_ms')}/{h.get('p99_ms')}/{h.get('max_ms')}" if h.get("probes")
              else "-")
        answered = sum(1 for _, r in p.requests if r.status is not None)
        ans = f"{answered}/{len(p.requests)}" if p.requests else "-"
        ssot = "-" if p.ssot_delta is None else f"{p.ssot_delta:+d}/{p.expect_records}"
        result = "SKIP" if p.skipped else ("PASS" if p.ok else "FAIL")
        fails = [f"{c}: {d}" for c, ok, d in p.checks if not ok]
        detail = p.skipped or ("; ".join(fails) if fails else key_figure(p))
        detail = detail.splitlines()[0] if detail else ""
        if len(detail) > 110:
            detail = detail[:107] + "..."
        print(f"{p.num} {p.name:<22} {result:<6} {hl:<24} {mib(p.peak_rss):>11} {ans:>8} "
              f"{ssot:>7}  {detail}")
    failed = [p for p in phases if not p.ok]
    for p in failed:
        for c, ok, d in p.checks:
            if not ok:
                print(f"  {p.num} {c}: {d}")
    print("FAIL: " + ", ".join(f"{p.num} {p.name}" for p in failed) if failed else "PASS")
    summary = {
        "ok": not failed, "short": args.short, "elapsed_s": round(elapsed, 1),
        "cutline_bytes": CUTLINE, "header_timeout": args.header_timeout,
        "idle_timeout": args.idle_timeout, "afo": args.afo, "model": args.model,
        "phases": [p.row() for p in phases],
        "failed": [f"{p.num} {p.name}" for p in failed],
    }
    path = os.path.join(args.out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"summary: {path}")


def key_figure(p):
    m = p.metrics
    if p.num == 0:
        c = m.get("calibration", {})
        return f"prefill ~{c.get('rate', 0):.0f} tokens/s"
    if "flood" in m:
        f = m["flood"]
        return (f"{f['closed_by_server_in_time']}/{f['connections']} closed by the server, "
                f"after {f['close_after_s_min']}..{f['close_after_s_max']} s")
    if p.num == 5:
        return f"idle {m.get('idle_after_disconnect_s')} s after the hang-up"
    if p.num == 7:
        return f"{m.get('status')} after {m.get('time_to_answer_s')} s"
    if p.num == 8:
        return f"restart {m.get('restart_s')} s; torn tail {m.get('torn_tail')}"
    if "answers" in m:
        return m["answers"][0][:80] if m["answers"] else ""
    return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
