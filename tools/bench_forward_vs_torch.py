#!/usr/bin/env python3
"""The ViT-B/32-shaped forward (random weights, batch 16, CPU) of the engine against HF transformers'
CLIPVisionModel on PyTorch, side by side in one run.

    tools/setup-venv.sh && .venv/bin/python tools/bench_forward_vs_torch.py [--rounds 3] [--reps 3] [--batch 16]

Rounds alternate between the two; each round is a median over --reps forwards after one warm-up.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "forward_probe"], cwd=ROOT, check=True)
    probe = os.path.join(ROOT, "target", "release", "examples", "forward_probe")
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig()).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    ours, theirs = [], []
    with torch.no_grad():
        model(pixel_values=x)
        for _ in range(args.rounds):
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                model(pixel_values=x)
                ts.append(time.perf_counter() - t)
            theirs.append(statistics.median(ts))
            out = subprocess.run([probe, str(args.batch), str(args.reps)], capture_output=True, text=True, check=True)
            ours.append(json.loads(out.stdout)["median_s"])
    t, o = statistics.median(theirs), statistics.median(ours)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, attention {model.config._attn_implementation}), "
          f"{os.cpu_count()} CPUs, batch {args.batch}")
    print(f"{'':<22} {'s/batch':>8} {'images/s':>9}")
    print(f"{'transformers (torch)':<22} {t:>8.3f} {args.batch / t:>9.1f}")
    print(f"{'wemoe-engine (cpu)':<22} {o:>8.3f} {args.batch / o:>9.1f}")
    print(f"ratio engine/torch throughput: {t / o:.2f}")


if __name__ == "__main__":
    main()
