#!/usr/bin/env python3
"""TIES-merging side by side: FusionBench's TiesMergingAlgorithm on PyTorch (CPU) against
`wemoe-engine merge --method ties-merging`, on the ViT-B/32-shaped checkpoints of
tools/bench_wemoe_vs_fusionbench.py (a pretrained model and 8 experts with random weights, under tools/out/b32/,
made here if missing), FusionBench's default settings (scaling 0.3, threshold 20, merge_func sum).

    cargo build --release && .venv/bin/python tools/bench_merge_vs_fusionbench.py [--rounds 2] [--experts 8]

Each side is one whole command in a process of its own (FusionBench's: load the nine models, merge, save with
save_pretrained; the engine's: the `merge` command), timed from start to exit, with its peak resident memory
from GNU time; the two alternate round by round. The merged models are compared tensor by tensor at the end.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(TOOLS, "..")
ENGINE = os.path.join(ROOT, "target", "release", "wemoe-engine")
sys.path.insert(0, TOOLS)
from bench_wemoe_vs_fusionbench import make_checkpoints, out_dir, run_engine  # noqa: E402

OUT = out_dir(32)  # ViT-B/32 shapes, the checkpoints bench_wemoe_vs_fusionbench.py makes


def child(args):
    """FusionBench's merge, as its `fusion_bench method=ties_merging` run does it, and the model saved."""
    start = time.perf_counter()
    from transformers import CLIPVisionModel

    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

    imported = time.perf_counter()
    pool = {"_pretrained_": CLIPVisionModel.from_pretrained(os.path.join(OUT, "pretrained"))}
    pool.update({f"e{t}": CLIPVisionModel.from_pretrained(os.path.join(OUT, f"e{t}")) for t in range(args.experts)})
    loaded = time.perf_counter()
    algorithm = TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum")
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints and profile table
        merged = algorithm.run(pool)
    done = time.perf_counter()
    merged.save_pretrained(args.child)
    print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "merge_s": done - loaded,
                      "save_s": time.perf_counter() - done}), file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    os.makedirs(OUT, exist_ok=True)
    make_checkpoints(args.experts, 32)
    tmp = tempfile.mkdtemp(dir=os.path.join(TOOLS, "out"))
    fb_out, engine_out = os.path.join(tmp, "fusionbench"), os.path.join(tmp, "engine")
    fusionbench = [sys.executable, os.path.abspath(__file__), "--experts", str(args.experts), "--child", fb_out]
    engine = [ENGINE, "merge", "--method", "ties-merging", "--pretrained", os.path.join(OUT, "pretrained"),
              "--out", engine_out]
    engine += [a for t in range(args.experts) for a in ("--expert", f"e{t}={os.path.join(OUT, f'e{t}')}")]
    results = {"FusionBench": [], "engine": []}
    for r in range(args.rounds):
        order = [("FusionBench", fusionbench), ("engine", engine)]
        for name, command in order if r % 2 == 0 else order[::-1]:
            shutil.rmtree(fb_out if name == "FusionBench" else engine_out, ignore_errors=True)
            seconds, peak, err = run_engine(command)
            results[name].append((seconds, peak))
            if name == "FusionBench":
                parts = json.loads([line for line in err.splitlines() if line.startswith("{")][-1])
                detail = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in parts.items())
            else:
                detail = next(line for line in err.splitlines() if line.startswith("ties-merging kept"))
            print(f"round {r + 1}: {name} {seconds:.1f} s, peak {peak:.0f} MiB ({detail})", flush=True)

    import torch
    from safetensors.torch import load_file

    theirs = load_file(os.path.join(fb_out, "model.safetensors"))
    ours = load_file(os.path.join(engine_out, "model.safetensors"))
    ours = {k.removeprefix("vision_model."): v for k, v in ours.items()}
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    worst = max(float((theirs[k] - ours[k]).abs().max()) for k in theirs)
    # By bits, so that 0.0 against -0.0 counts too.
    differing = sum(int((theirs[k].view(torch.int32) != ours[k].view(torch.int32)).sum()) for k in theirs)
    size = os.path.getsize(os.path.join(engine_out, "model.safetensors")) / 2**20
    print(f"\n{args.experts} experts, ViT-B/32 shapes, {os.cpu_count()} CPUs, output {size:.0f} MiB")
    print("| command | seconds (each round) | peak MiB (each round) |")
    print("| --- | --- | --- |")
    for name, runs in results.items():
        print(f"| {name} | {', '.join(f'{s:.1f}' for s, _ in runs)} | {', '.join(f'{p:.0f}' for _, p in runs)} |")
    speed = [f[0] / e[0] for f, e in zip(results["FusionBench"], results["engine"])]
    memory = [e[1] / f[1] for f, e in zip(results["FusionBench"], results["engine"])]
    print(f"engine speed-up per round: {', '.join(f'{x:.1f}x' for x in speed)}; "
          f"memory ratio: {', '.join(f'{x:.2f}' for x in memory)}")
    print(f"largest |difference| of any merged element: {worst:.2e} ({differing} elements of other bits)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
