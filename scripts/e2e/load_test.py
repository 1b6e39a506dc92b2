"""A bounded loopback load test of `afo serve`: CLIENTS concurrent streaming clients
send REQUESTS chat completions in all, through the official `openai` client.

Checks: no errors except intended 429s (retried after `Retry-After`), resident memory
under the cutline at every `/health` sample, and one SSOT line per completed request.
Prints throughput, latency and time-to-first-token percentiles.

Usage: python load_test.py BASE_URL MODEL_ID SSOT_LOG [CLIENTS] [REQUESTS] [MAX_TOKENS]
"""

import asyncio
import json
import statistics
import sys
import time

import urllib.request
import openai
from openai import AsyncOpenAI

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colors.",
    "What is a prime number?",
    "Give me a tip for learning Rust.",
    "Describe a cat in a few words.",
    "What is the capital of Italy?",
    "Say something kind.",
    "Explain what a CPU does.",
]


def pct(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def main() -> None:
    base, model, log = sys.argv[1], sys.argv[2], sys.argv[3]
    clients = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    total = int(sys.argv[5]) if len(sys.argv) > 5 else 128
    max_tokens = int(sys.argv[6]) if len(sys.argv) > 6 else 32
    root = base.removesuffix("/v1")
    before = sum(1 for _ in open(log)) if log and __import__("os").path.exists(log) else 0

    client = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    results, errors, rejected = [], [], 0
    peak = {"resident": 0, "cutline": 0, "badges": set()}
    done = asyncio.Event()

    async def sample() -> None:
        def get():
            with urllib.request.urlopen(root + "/health", timeout=10) as r:
                return json.load(r)

        while not done.is_set():
            v = await asyncio.to_thread(get)
            peak["resident"] = max(peak["resident"], v["memory"]["resident_bytes"])
            peak["cutline"] = v["memory"]["cutline_bytes"]
            peak["badges"].add(v["badge"])
            await asyncio.sleep(0.2)

    async def worker() -> None:
        nonlocal rejected
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            while True:
                start = time.perf_counter()
                first = None
                tokens = 0
                try:
                    stream = await client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
                        stream_options={"include_usage": True},
                    )
                    async for chunk in stream:
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.perf_counter()
                        if chunk.usage is not None:
                            tokens = chunk.usage.completion_tokens
                    end = time.perf_counter()
                    results.append({"latency": end - start, "ttft": (first or end) - start, "tokens": tokens})
                    break
                except openai.RateLimitError as e:
                    rejected += 1
                    await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
                except Exception as e:  # noqa: BLE001 - every other failure counts
                    errors.append(repr(e))
                    break

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    done.set()
    await sampler

    await asyncio.sleep(0.5)
    after = sum(1 for _ in open(log))
    lines = [json.loads(l) for l in open(log)][before:]
    ok_lines = sum(1 for l in lines if l["status"] == "ok")
    decode = [l["tokens_per_s"] for l in lines if l["status"] == "ok" and l["tokens_per_s"] > 0]
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    summary = {
        "clients": clients, "requests": total, "max_tokens": max_tokens,
        "completed": len(results), "errors": len(errors), "rejected_429_retried": rejected,
        "wall_s": round(wall, 2), "requests_per_s": round(len(results) / wall, 2),
        "output_tokens": tokens, "output_tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(statistics.median(lat), 3), "latency_p95_s": round(pct(lat, 95), 3),
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(pct(ttft, 95), 3),
        "peak_resident_mib": round(peak["resident"] / 2**20, 1), "cutline_mib": round(peak["cutline"] / 2**20, 1),
        "server_decode_tok_s_per_request_p50": round(statistics.median(decode), 1) if decode else None,
        "badges_seen": sorted(peak["badges"]), "ssot_lines": after - before, "ssot_ok_lines": ok_lines,
    }
    print(json.dumps(summary, indent=2))
    failures = []
    if errors:
        failures.append(f"{len(errors)} errors, first: {errors[0]}")
    if len(results) != total:
        failures.append(f"{len(results)} of {total} requests completed")
    if peak["resident"] >= peak["cutline"]:
        failures.append("resident memory reached the cutline")
    if ok_lines != len(results):
        failures.append(f"{ok_lines} ok SSOT lines for {len(results)} completed requests")
    if failures:
        print("load test FAILED: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)
    print("load test passed")


if __name__ == "__main__":
    asyncio.run(main())
