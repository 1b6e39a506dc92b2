#!/usr/bin/env python3
"""Time between tokens of a stream while a long prompt arrives (loopback only).

Starts `afo serve` (AFO_BIN, default target/release/afo) on 127.0.0.1 with the given
--prefill-chunk, streams one chat (A, 300 tokens), and 1 s into it sends a chat with a
~3,000-token prompt (B). Prints A's gaps between chunks while B's prompt runs: the
largest and the median, and B's time to its answer. Run it once per chunk size (64 is the server's default):

    python3 scripts/e2e/interleave.py --prefill-chunk 256
    python3 scripts/e2e/interleave.py --prefill-chunk 100000   # the prompt in one pass
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from harness import model_id as id_of

ap = argparse.ArgumentParser()
ap.add_argument("--prefill-chunk", type=int, default=64)
ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--prompt-tokens", type=int, default=3000)
args = ap.parse_args()
binary = os.environ.get("AFO_BIN", "target/release/afo")
model_id = id_of(args.model)

server = subprocess.Popen(
    [binary, "--threads", "2", "serve", "--model", args.model, "--port", "0",
     "--prefill-chunk", str(args.prefill_chunk), "--cutline", "4GiB"],
    stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 120
port = None
while port is None and time.monotonic() < deadline:
    line = server.stderr.readline()
    if "listening on http://" in line:
        port = int(line.split("listening on http://")[1].split()[0].split(":")[1])
if port is None:
    server.kill()
    sys.exit("afo serve did not start")
threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()


def post(body, stream):
    s = socket.create_connection(("127.0.0.1", port), timeout=300)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(data) + data)
    return s


times = []
b_window = {}


def stream_a():
    s = post({"model": model_id, "stream": True, "max_tokens": 300, "temperature": 0.8, "seed": 1,
              "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}]},
             True)
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        now = time.monotonic()
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if b'"content":"' in event and b'"content":""' not in event:
                times.append(now)
    s.close()


def long_b():
    text = "The quick brown fox jumps over the lazy dog near the river bank. " * (args.prompt_tokens // 14)
    b_window["start"] = time.monotonic()
    s = post({"model": model_id, "max_tokens": 1,
              "messages": [{"role": "user", "content": text}]}, False)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    b_window["end"] = time.monotonic()
    b_window["status"] = got.split(b" ", 2)[1].decode() if got else "none"
    s.close()


try:
    a = threading.Thread(target=stream_a)
    a.start()
    time.sleep(1.0)
    b = threading.Thread(target=long_b)
    b.start()
    b.join()
    a.join()
finally:
    server.terminate()
    server.wait(10)

start, end = b_window["start"], b_window["end"]
gaps = [(t1 - t0) for t0, t1 in zip(times, times[1:]) if t1 > start and t0 < end]
before = [(t1 - t0) for t0, t1 in zip(times, times[1:]) if t1 <= start]
print(f"prefill chunk {args.prefill_chunk}: B ({args.prompt_tokens} tokens) answered "
      f"{b_window['status']} in {end - start:.2f} s; A's gaps while B ran: "
      f"max {max(gaps) * 1e3:.0f} ms, median {statistics.median(gaps) * 1e3:.0f} ms over "
      f"{len(gaps)} gaps; before B: median {statistics.median(before) * 1e3:.0f} ms")
