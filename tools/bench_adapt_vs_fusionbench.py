#!/usr/bin/env python3
"""One test-time adaptation step of the engine (CPU) against FusionBench's WEMoE module and entropy loss with
torch.optim.Adam (PyTorch CPU), side by side in one run: ViT-B/32 shapes, 8 experts, depth-2 routers, 8 tasks
of 16 images each per step (the summed batch-mean entropy), through the projection and each task's head.

    tools/setup-venv.sh && .venv/bin/python tools/bench_adapt_vs_fusionbench.py [--steps 2] [--fb-sample-images 1]
        [--routings batch,sample] [--precision f32|bf16]

Uses the checkpoints of tools/bench_wemoe_vs_fusionbench.py (made here if missing, about 3.5 GB under
tools/out/b32/) and writes heads8.safetensors there (8 heads of 10 classes and a 512-wide projection, random).
Each contender runs in a process of its own, so its peak resident memory is its own (FusionBench's its process's
ru_maxrss, the engine's from GNU time, see run_engine). FusionBench's step time is the median over steps after one
warm-up step; the engine's is (time of 1 + steps) − (time of 1 step), loading and writing cancelling out. Batch
routing runs 8 × 16 on both sides; per-sample routing runs 8 × 16 on the engine, and on FusionBench with
--fb-sample-images per task, because its autograd keeps every sample's merged weights (the issue measured 11 GB
at one image per task and out of memory at four). With `--precision bf16` both sides multiply bf16 operands with
f32 accumulation: the engine with `--precision bf16` (AMX tiles: the forward's products, and the backward's
through frozen weights where its path has them), FusionBench's forward and loss under
`torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN on AMX; autograd runs each product's backward in its
forward's dtype).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_wemoe_vs_fusionbench import ROOT, make_checkpoints, out_dir, run_engine  # noqa: E402

OUT = out_dir(32)  # ViT-B/32 shapes, the checkpoints bench_wemoe_vs_fusionbench.py makes

TASKS, PER_TASK, CLASSES = 8, 16, 10


def make_heads():
    path = os.path.join(OUT, "heads8.safetensors")
    if not os.path.exists(path):
        import torch
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(8)
        heads = {f"head.t{t}": torch.randn(CLASSES, 512, generator=g) * 0.05 for t in range(TASKS)}
        heads["visual_projection.weight"] = torch.randn(512, 768, generator=g) * 0.02
        save_file(heads, path)
    return path


def prepare():
    """The B/32 checkpoints and heads (made if missing) and the engine, built: (heads path, engine path)."""
    make_checkpoints(8, 32)
    heads = make_heads()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return heads, os.path.join(ROOT, "target", "release", "wemoe-engine")


def fusionbench_step_seconds(args):
    """Child process: FusionBench's model, loss and Adam; prints JSON {seconds, peak_mib, images_per_task}."""
    import copy
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel
    from fusion_bench.models.we_moe import WeightEnsemblingMoE
    import fusionbench_losses
    entropy_loss = fusionbench_losses.entropy_loss("we_moe")

    base = CLIPVisionModel.from_pretrained(os.path.join(OUT, "pretrained")).eval()
    experts = [CLIPVisionModel.from_pretrained(os.path.join(OUT, f"e{t}")).eval() for t in range(8)]
    moe = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        sd = {k: v + 0.3 * sum(e.state_dict()[k] - v for e in experts) for k, v in base.state_dict().items()}
        moe.load_state_dict(sd)
    for i, layer in enumerate(moe.encoder.layers):
        layer.mlp = WeightEnsemblingMoE(hidden_size=768, base_model=base.encoder.layers[i].mlp,
                                        expert_models=[e.encoder.layers[i].mlp for e in experts], init_lambda=0.3,
                                        batch_first=True, router_hidden_layers=2,
                                        batch_reduce=args.routing == "batch")
    del experts
    moe.requires_grad_(False)
    routers = [p for layer in moe.encoder.layers for p in layer.mlp.gate.parameters()]
    for p in routers:
        p.requires_grad_(True)
    heads = load_file(os.path.join(OUT, "heads8.safetensors"))
    projection = heads["visual_projection.weight"]
    pixels = load_file(os.path.join(OUT, "pixels64.safetensors"))["pixel_values"][: args.images]
    optimizer = torch.optim.Adam(routers, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    times = []
    for step in range(1 + args.steps):
        if step == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak of the steps, not of construction
        t0 = time.perf_counter()
        optimizer.zero_grad()
        for t in range(TASKS):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                pooled = moe(pixel_values=pixels).pooler_output
                embeds = F.normalize(pooled @ projection.T, dim=-1)
                logits = 100.0 * embeds @ heads[f"head.t{t}"].T
                loss = entropy_loss(logits)
            loss.backward()  # gradients add up over tasks: the summed loss
        optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as f:
        hwm = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": hwm / 1024, "images_per_task": args.images}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--fb-sample-images", type=int, default=1)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--routing", default="batch")
    ap.add_argument("--images", type=int, default=PER_TASK)
    ap.add_argument("--routings", default="batch,sample", help="which routing modes to measure")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="both sides' products: f32, or bf16 operands (engine --precision bf16, torch autocast)")
    args = ap.parse_args()
    if args.child:
        return fusionbench_step_seconds(args)
    heads, engine = prepare()
    moe = os.path.join(OUT, "wemoe")
    assert os.path.exists(moe), "run tools/bench_wemoe_vs_fusionbench.py first: it merges tools/out/b32/wemoe"
    pixels = os.path.join(OUT, "pixels64.safetensors")
    print(f"ViT-B/32 shapes, 8 experts, {TASKS} tasks per step, {args.precision}, {os.cpu_count()} CPUs")
    print(f"{'routing':<8} {'FusionBench s/step':>19} {'(images/task)':>14} {'engine s/step':>14} {'speed-up':>9} "
          f"{'FB peak MiB':>12} {'engine peak MiB':>16}")
    for routing in args.routings.split(","):
        fb_images = PER_TASK if routing == "batch" else args.fb_sample_images
        fb = subprocess.run([sys.executable, __file__, "--child", "--routing", routing, "--images", str(fb_images),
                             "--steps", str(args.steps), "--precision", args.precision],
                            capture_output=True, text=True)
        theirs = json.loads(fb.stdout.strip().splitlines()[-1]) if fb.returncode == 0 else None
        base = [engine, "adapt", "--model", moe, "--heads", heads, "--batch-size", str(PER_TASK), "--routing", routing,
                "--device", "cpu", "--quiet", "--precision", args.precision]
        for t in range(TASKS):
            base += ["--task", f"t{t}={pixels}"]
        outs = [f"/tmp/wemoe-bench-adapt-{routing}-{n}" for n in (1, 1 + args.steps)]
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)  # a finished run leaves its checkpoint, which adapt won't overwrite
        one, peak1, _ = run_engine(base + ["--out", outs[0], "--steps", "1"])
        more, peak, _ = run_engine(base + ["--out", outs[1], "--steps", str(1 + args.steps)])
        ours = (more - one) / args.steps
        if theirs is None:
            print(f"{routing:<8} {'failed: ' + fb.stderr.strip().splitlines()[-1][:60]:>34} {ours:>14.1f}")
            continue
        speed = f"{theirs['seconds'] / ours:.2f}x" if fb_images == PER_TASK else "n/a"
        print(f"{routing:<8} {theirs['seconds']:>19.1f} {fb_images:>14} {ours:>14.1f} {speed:>9} "
              f"{theirs['peak_mib']:>12.0f} {max(peak, peak1):>16.0f}")


if __name__ == "__main__":
    main()
