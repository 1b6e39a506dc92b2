"""The Python package's overhead over the Rust runtime on a 64-token generation.

    python crates/python/benches/overhead.py MODEL [--rust BIN] [--blocks 5] [--rounds 4]

Greedy, 64 tokens (end of sequence ignored), the same prompt, a warm model. Each
round times `Runtime.generate` from Python (wall) and reads the runtime's own wall
time of the call (`timings["latency_ms"]`, measured inside Rust). With --rust (the
`overhead` example, built with --release), blocks of Python rounds alternate with
blocks of a Rust process's `Runtime::generate` rounds. Prints the medians and ratios.
"""

import argparse
import statistics
import subprocess
import time

import afo

PROMPT = "The history of the printing press"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rust", help="the overhead example binary")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()

    rt = afo.Runtime(cutline="8GiB")
    args = dict(prompt=PROMPT, max_tokens=64, temperature=0.0, ignore_eos=True)
    rt.generate(a.model, **args)  # warm
    py_wall, py_inner, rust_wall = [], [], []
    for _ in range(a.blocks):
        for _ in range(a.rounds):
            start = time.perf_counter()
            r = rt.generate(a.model, **args)
            py_wall.append((time.perf_counter() - start) * 1e3)
            py_inner.append(r.timings["latency_ms"])
            assert r.usage["completion_tokens"] == 64
        if a.rust:
            out = subprocess.run([a.rust, a.model, str(a.rounds)], check=True,
                                 capture_output=True, text=True).stdout
            rust_wall += [float(x) for x in out.split()]

    med = statistics.median
    print(f"python wall      median {med(py_wall):8.2f} ms over {len(py_wall)} rounds")
    print(f"runtime latency  median {med(py_inner):8.2f} ms (timings['latency_ms'])")
    per_round = [w - i for w, i in zip(py_wall, py_inner)]
    print(f"binding overhead median {med(per_round):8.3f} ms per call = "
          f"{100 * med(per_round) / med(py_inner):.2f}% of the call")
    if rust_wall:
        print(f"rust wall        median {med(rust_wall):8.2f} ms over {len(rust_wall)} rounds")
        print(f"python / rust    {med(py_wall) / med(rust_wall):.4f}")


if __name__ == "__main__":
    main()
