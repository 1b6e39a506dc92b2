#!/usr/bin/env python3
"""Side-by-side measurements of afo-image against the Hugging Face processor.

    pip install transformers pillow numpy
    cargo build --release -p afo-image --examples
    python3 crates/image/benches/compare_hf.py [--threads 1] [--reps 5] [--out /tmp/afo-photos]

1. Generates synthetic photos (a smooth gradient plus noise, JPEG quality 90) at
   4000x3000 (12 MP) and 6000x4000 (24 MP) in --out; they are never committed.
2. Peak memory: runs `examples/peak` as `ours` (full layout), `compact` (the compact
   still-image layout) and `naive` in separate processes per photo and config, reading each process's VmHWM, and the Hugging Face processor in
   its own process too (its ru_maxrss).
3. Throughput: images/s of `examples/throughput` and of the Hugging Face processor
   (Qwen2VLImageProcessorPil, loading with PIL) over the same photos, alternately,
   with the same thread count (the Python processor is single-threaded; with
   --threads N it runs N processes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EXAMPLES = os.path.join(ROOT, "target", "release", "examples")

CONFIGS = {
    "qwen3-vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                     image_mean=[0.5] * 3, image_std=[0.5] * 3,
                     size={"shortest_edge": 65536, "longest_edge": 16777216}),
    "qwen3-vl:1048576": dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             size={"shortest_edge": 65536, "longest_edge": 1048576}),
}


def make_photo(path, w, h, seed):
    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 40 + 180 * x
    img[..., 1] = 30 + 200 * y
    img[..., 2] = 128 + 90 * np.sin(6 * x + 4 * y)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


HF_SNIPPET = r"""
import sys, time, json, resource
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
cfg = json.loads(sys.argv[1]); files = sys.argv[3:]; reps = int(sys.argv[2])
proc = Qwen2VLImageProcessorPil(**cfg)
for _ in range(reps):
    t = time.perf_counter()
    for f in files:
        out = proc(images=[Image.open(f)], return_tensors="np")
        del out
    print(json.dumps({"secs": time.perf_counter() - t, "n": len(files)}), flush=True)
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def hf_run(cfg, files, reps, procs):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    chunks = [files[i::procs] for i in range(procs)]
    t = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, "-c", HF_SNIPPET, json.dumps(cfg), str(reps), *c],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
          for c in chunks if c]
    outs = [p.communicate()[0] for p in ps]
    wall = time.perf_counter() - t
    lines = [[json.loads(l) for l in o.splitlines() if l.startswith("{")] for o in outs]
    # Per repetition, the slowest process sets the wall time of that repetition.
    reps_secs = [max(ls[i]["secs"] for ls in lines) for i in range(reps)]
    maxrss = max(ls[-1]["maxrss_kib"] for ls in lines) * 1024
    return [len(files) / s for s in reps_secs], maxrss, wall


def ours_run(config, files, reps, threads, resampler="exact"):
    env = dict(os.environ, RESAMPLER=resampler)
    out = subprocess.run([os.path.join(EXAMPLES, "throughput"), str(threads), str(reps), config, *files],
                         capture_output=True, text=True, env=env, check=True).stdout
    return [float(l.split("=")[1].split()[0]) for l in out.splitlines() if l.startswith("rep ")]


def peak(path_kind, photo, config):
    name, _, maxp = config.partition(":")
    cmd = [os.path.join(EXAMPLES, "peak"), path_kind, photo, name] + ([maxp] if maxp else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return float(fields["peak_mib"]), float(fields["time_ms"]), fields["grid_thw"]


def hf_peak(photo, config):
    _, maxrss, _ = hf_run(CONFIGS[config], [photo], 1, 1)
    return maxrss / (1 << 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/afo-photos")
    ap.add_argument("--peak-only", action="store_true", help="skip the throughput part")
    ap.add_argument("--throughput-only", action="store_true", help="skip the peak memory part")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    photos = []
    for (w, h, seed) in [(4000, 3000, 1), (6000, 4000, 2)]:
        p = os.path.join(args.out, f"photo_{w}x{h}.jpg")
        make_photo(p, w, h, seed)
        photos.append(p)
        print(f"{p}: {os.path.getsize(p)} bytes", file=sys.stderr)

    if not args.throughput_only:
        peak_table(photos, args)
    if args.peak_only:
        return
    throughput_table(photos, args)


def peak_table(photos, args):
    print("## peak memory (MiB, one process each; median of", args.rounds, "runs)")
    print("| photo | config | ours (full) | ours (compact) | naive | full vs naive "
          "| compact vs naive | HF processor |")
    for photo in photos:
        for config in CONFIGS:
            ours, compact, naive = [], [], []
            for _ in range(args.rounds):  # interleaved, so that load hits all alike
                ours.append(peak("ours", photo, config)[0])
                compact.append(peak("compact", photo, config)[0])
                naive.append(peak("naive", photo, config)[0])
            ours, compact, naive = map(statistics.median, (ours, compact, naive))
            hf = hf_peak(photo, config)
            print(f"| {os.path.basename(photo)} | {config} | {ours:.0f} | {compact:.0f} | "
                  f"{naive:.0f} | {100 * (1 - ours / naive):.0f}% lower | "
                  f"{100 * (1 - compact / naive):.0f}% lower | {hf:.0f} |", flush=True)


def throughput_table(photos, args):
    print(f"## throughput (images/s, {args.threads} thread(s), alternating rounds, medians)")
    print("| config | ours (exact) | ours (simd) | HF processor | exact / HF | simd / HF |")
    files = photos * 2
    for config in CONFIGS:
        ours, simd, hf = [], [], []
        for _ in range(args.rounds):
            ours += ours_run(config, files, args.reps, args.threads)
            simd += ours_run(config, files, args.reps, args.threads, "simd")
            rates, _, _ = hf_run(CONFIGS[config], files, max(1, args.reps // 2), args.threads)
            hf += rates
        o, s, h = statistics.median(ours), statistics.median(simd), statistics.median(hf)
        print(f"| {config} | {o:.3f} | {s:.3f} | {h:.3f} | {o / h:.2f}x | {s / h:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
