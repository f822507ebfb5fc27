#!/usr/bin/env python3
"""The engine's CPU GEMM against PyTorch's CPU matmul, side by side in one run.

    tools/setup-venv.sh && .venv/bin/python tools/bench_gemm_vs_torch.py [--rounds 5] [--reps 10] [--layouts nt,nn]

Both use every core of this machine (torch's default threads, rayon's default pool). Rounds alternate
between the two so that drift of the machine hits both alike; each round reports a median over --reps
products after warm-up, and the table gives the median of the rounds. Layout `bf16` (on CPUs with AMX) multiplies
bf16 operands: torch on tensors already in bf16 (oneDNN, a bf16 output), the engine as `--precision bf16` runs a
product (both operands rounded from f32 and packed in each product, an f32 output).
"""
import argparse
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = [(3200, 768, 3072), (3200, 3072, 768)]


def torch_median(m, k, n, layout, reps):
    dtype = torch.bfloat16 if layout == "bf16" else torch.float32
    a = torch.rand(m, k, dtype=dtype)
    b = torch.rand(k, n, dtype=dtype) if layout != "nt" else torch.rand(n, k)
    c = torch.empty(m, n, dtype=dtype)
    run = (lambda: torch.mm(a, b.t(), out=c)) if layout == "nt" else (lambda: torch.matmul(a, b, out=c))
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layouts", default="nt,nn", help="nt, nn and/or bf16 (AMX), comma-separated")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "gemm_probe"], cwd=ROOT, check=True)
    probe = os.path.join(ROOT, "target", "release", "examples", "gemm_probe")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs")
    print(f"{'shape':<22} {'layout':<6} {'torch GFLOP/s':>14} {'engine GFLOP/s':>15} {'ratio':>6}")
    for m, k, n in SHAPES:
        for layout in args.layouts.split(","):
            ours, theirs = [], []
            for _ in range(args.rounds):
                theirs.append(torch_median(m, k, n, layout, args.reps))
                out = subprocess.run([probe, str(m), str(k), str(n), str(args.reps), layout],
                                     capture_output=True, text=True, check=True)
                ours.append(float(out.stdout))
            flops = 2.0 * m * k * n
            t, o = statistics.median(theirs), statistics.median(ours)
            print(f"({m}x{k})·({k}x{n})".ljust(22), f"{layout:<6} {flops / t / 1e9:>14.1f} {flops / o / 1e9:>15.1f} "
                  f"{t / o:>6.2f}")


if __name__ == "__main__":
    main()
