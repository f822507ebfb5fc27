#!/usr/bin/env python3
"""One step of layer-wise AdaMerging: the engine (`merge --method adamerging`, CPU) against FusionBench's
LayerWiseMergedModel, adamerging entropy loss and torch.optim.Adam (PyTorch CPU), side by side in one run:
ViT-B/32 shapes, 8 experts, 8 tasks of 16 images per step (a backward per task, one Adam step, the model merged
again), through the projection and each task's head.

    tools/setup-venv.sh && .venv/bin/python tools/bench_adamerging_vs_fusionbench.py [--steps 2] [--rounds 1]

Uses the checkpoints and heads of tools/bench_adapt_vs_fusionbench.py (made here if missing, about 3.5 GB under
tools/out/b32/). Each contender runs in a process of its own. FusionBench's step time is the median over steps
after one warm-up step, its peak its process's VmHWM over the steps (construction excluded). The engine's step
time is (time of 1 + steps) − (time of 1 step), so that loading the inputs and writing the merged model cancel
out; its peak is GNU time's over the whole command. Rounds alternate the two contenders.
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
from bench_adapt_vs_fusionbench import PER_TASK, TASKS, prepare  # noqa: E402
from bench_wemoe_vs_fusionbench import out_dir, run_engine  # noqa: E402

OUT = out_dir(32)  # ViT-B/32 shapes, the checkpoints bench_wemoe_vs_fusionbench.py makes


def fusionbench_step_seconds(args):
    """Child process: FusionBench's AdaMerging loop; prints JSON {seconds, peak_mib}."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
    import fusionbench_losses
    entropy_loss = fusionbench_losses.entropy_loss("adamerging")

    base = CLIPVisionModel.from_pretrained(os.path.join(OUT, "pretrained")).eval()
    experts = [CLIPVisionModel.from_pretrained(os.path.join(OUT, f"e{t}")).eval() for t in range(8)]
    count = len([p for p in base.parameters() if p.requires_grad])
    model = LayerWiseMergedModel(layer_wise_weight=get_layer_wise_weights(len(experts), count, 0.3),
                                 pretrained_model=base, finetuned_models=experts, clamp_weights=False,
                                 tie_weights=True, strict=False)
    heads = load_file(os.path.join(OUT, "heads8.safetensors"))
    projection = heads["visual_projection.weight"]
    pixels = load_file(os.path.join(OUT, "pixels64.safetensors"))["pixel_values"][:PER_TASK]
    optimizer = torch.optim.Adam([model.merge_weight], lr=1e-3)
    model.merge_weights()
    times = []
    for step in range(1 + args.steps):
        if step == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak of the steps, not of construction
        t0 = time.perf_counter()
        for t in range(TASKS):
            pooled = model(pixels)[1]
            embeds = F.normalize(pooled @ projection.T, dim=-1)
            loss = entropy_loss(100.0 * embeds @ heads[f"head.t{t}"].T)
            loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        model.merge_weights()
        if step > 0:
            times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as f:
        hwm = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": hwm / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return fusionbench_step_seconds(args)
    heads, engine = prepare()
    pixels = os.path.join(OUT, "pixels64.safetensors")
    base = [engine, "merge", "--method", "adamerging", "--pretrained", os.path.join(OUT, "pretrained"),
            "--heads", heads, "--batch-size", str(PER_TASK), "--device", "cpu", "--quiet"]
    for t in range(TASKS):
        base += ["--expert", f"e{t}={os.path.join(OUT, f'e{t}')}", "--task", f"t{t}={pixels}"]
    print(f"ViT-B/32 shapes, 8 experts, {TASKS} tasks × {PER_TASK} images per step, {os.cpu_count()} CPUs")
    print(f"{'round':<6} {'FusionBench s/step':>19} {'engine s/step':>14} {'speed-up':>9} {'FB peak MiB':>12} "
          f"{'engine peak MiB':>16}")
    for r in range(1, args.rounds + 1):
        fb = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)],
                            capture_output=True, text=True)
        theirs = json.loads(fb.stdout.strip().splitlines()[-1]) if fb.returncode == 0 else None
        outs = [f"/tmp/wemoe-bench-adamerging-{n}" for n in (1, 1 + args.steps)]
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        one, peak1, _ = run_engine(base + ["--out", outs[0], "--steps", "1"])
        more, peak, _ = run_engine(base + ["--out", outs[1], "--steps", str(1 + args.steps)])
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        ours = (more - one) / args.steps
        if theirs is None:
            print(f"{r:<6} {'failed: ' + fb.stderr.strip().splitlines()[-1][:60]:>34} {ours:>14.1f}")
            continue
        print(f"{r:<6} {theirs['seconds']:>19.1f} {ours:>14.1f} {theirs['seconds'] / ours:>8.2f}x "
              f"{theirs['peak_mib']:>12.0f} {max(peak, peak1):>16.0f}")


if __name__ == "__main__":
    main()
