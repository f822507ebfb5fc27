#!/usr/bin/env python3
"""WEMoE inference of the engine (CPU) against FusionBench's WeightEnsemblingMoE on PyTorch (CPU), side by side in
one run, on a ViT-B/32-shaped model with 8 experts (random weights made here) and 64 images.

    tools/setup-venv.sh && .venv/bin/python tools/bench_wemoe_vs_fusionbench.py [--images 64] [--experts 8] [--rounds 3]
        [--precision f32|bf16] [--patch 32|16]

Writes its checkpoints (about 5 GB) under tools/out/b32/ (with `--patch 16`, ViT-B/16 shapes: 197 tokens instead of
50, under tools/out/b16/). Each contender runs in a process of its own, so its peak resident memory (VmHWM) is its
own: FusionBench's is measured from just before its first forward (the peak is
reset after the model is built); the engine's covers its whole `embed` command, loading included (measured by GNU
time, /usr/bin/time, since this script's own peak would otherwise show through). Throughput is
the forward alone on both sides (the engine's `embed` reports its compute time apart from loading). Routing: per
sample (FusionBench: batch_reduce=False; engine: --routing sample) and batch (batch_reduce=True; --routing batch),
all 64 images in one batch. The machine is shared and its speed drifts, so the two alternate round by round and
each round's ratio is printed, then the medians. With `--precision bf16` both sides multiply bf16 operands with
f32 accumulation: the engine with `--precision bf16` (AMX tiles), FusionBench's forward under
`torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN, which uses AMX where the CPU has it).
"""
import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def out_dir(patch):
    """Where the checkpoints, pixels and outputs of ViT-B/`patch` shapes live."""
    return os.path.join(ROOT, "tools", "out", f"b{patch}")


def vm_hwm_kib():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])


def make_checkpoints(experts, patch):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel
    folder = out_dir(patch)
    if os.path.exists(os.path.join(folder, f"e{experts - 1}", "model.safetensors")):
        return
    torch.manual_seed(0)
    base = CLIPVisionModel(CLIPVisionConfig(patch_size=patch)).eval()
    base.save_pretrained(os.path.join(folder, "pretrained"))
    for t in range(experts):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.1 * p.abs().mean() * torch.randn_like(p))
        e.save_pretrained(os.path.join(folder, f"e{t}"))
    pixels = torch.randn(256, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    save_file({"pixel_values": pixels}, os.path.join(folder, "pixels256.safetensors"))


def fusionbench(args):
    """Child process: build FusionBench's WEMoE model, then time its forward in both modes."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel
    from fusion_bench.models.we_moe import WeightEnsemblingMoE
    folder = out_dir(args.patch)
    base = CLIPVisionModel.from_pretrained(os.path.join(folder, "pretrained")).eval()
    experts = [CLIPVisionModel.from_pretrained(os.path.join(folder, f"e{t}")).eval() for t in range(args.experts)]
    moe = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():  # task arithmetic, lambda 0.3
        sd = {k: v + 0.3 * sum(e.state_dict()[k] - v for e in experts) for k, v in base.state_dict().items()}
        moe.load_state_dict(sd)
    for i, layer in enumerate(moe.encoder.layers):
        layer.mlp = WeightEnsemblingMoE(hidden_size=768, base_model=base.encoder.layers[i].mlp,
                                        expert_models=[e.encoder.layers[i].mlp for e in experts], init_lambda=0.3,
                                        batch_first=True, router_hidden_layers=2, batch_reduce=False)
    del experts
    pixels = load_file(os.path.join(folder, "pixels256.safetensors"))["pixel_values"][: args.images]
    result = {}
    for mode, reduce in (("sample", False), ("batch", True)):
        for layer in moe.encoder.layers:
            layer.mlp.batch_reduce = reduce
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: measure inference, not construction
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            t = time.perf_counter()
            moe(pixel_values=pixels)
            seconds = time.perf_counter() - t
        result[mode] = {"images_per_s": args.images / seconds, "peak_mib": vm_hwm_kib() / 1024}
    print(json.dumps(result))


TIME = "/usr/bin/time"
PEAK = "engine peak KiB: "


def run_engine(cmd):
    """(wall seconds, peak MiB, stderr) of an engine command. The peak comes from GNU time, whose own child it
    is: a child of this process would report at least this process's peak (Linux keeps ru_maxrss across
    fork and exec, and this process holds torch), which hid an engine smaller than it."""
    t = time.perf_counter()
    wrapped = os.access(TIME, os.X_OK)
    proc = subprocess.Popen(([TIME, "-f", PEAK + "%M"] if wrapped else []) + cmd, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, f"{cmd} failed: {err}"
    seconds = time.perf_counter() - t
    if not wrapped:
        print(f"warning: no {TIME}; the engine's peak is at least this script's own", file=sys.stderr)
        return seconds, usage.ru_maxrss / 1024, err
    lines = err.splitlines()
    peak = next(int(line[len(PEAK):]) for line in reversed(lines) if line.startswith(PEAK))
    return seconds, peak / 1024, "\n".join(line for line in lines if not line.startswith(PEAK))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="FusionBench-then-engine rounds; the medians are reported")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                    help="both sides' products: f32, or bf16 operands (engine --precision bf16, torch autocast)")
    ap.add_argument("--patch", type=int, choices=[32, 16], default=32,
                    help="the patch size: ViT-B/32 shapes (50 tokens) or ViT-B/16 (197)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return fusionbench(args)
    folder = out_dir(args.patch)
    os.makedirs(folder, exist_ok=True)
    make_checkpoints(args.experts, args.patch)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    engine = os.path.join(ROOT, "target", "release", "wemoe-engine")
    moe = os.path.join(folder, "wemoe")
    if not os.path.exists(moe):
        cmd = [engine, "merge", "--pretrained", os.path.join(folder, "pretrained"), "--out", moe, "--quiet"]
        for t in range(args.experts):
            cmd += ["--expert", f"e{t}={os.path.join(folder, f'e{t}')}"]
        seconds, peak, _ = run_engine(cmd)
        size = os.path.getsize(os.path.join(moe, "model.safetensors")) / 2**20
        print(f"engine merge: {seconds:.1f} s, peak {peak:.0f} MiB for a {size:.0f} MiB output ({peak / size:.2f}x)")
    from safetensors.torch import load_file, save_file
    pixels = os.path.join(folder, f"pixels{args.images}.safetensors")
    if not os.path.exists(pixels):
        save_file({"pixel_values": load_file(os.path.join(folder, "pixels256.safetensors"))["pixel_values"][: args.images]
                   .contiguous()}, pixels)
    print(f"{args.images} images, {args.experts} experts, ViT-B/{args.patch} shapes, {args.precision}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds (FusionBench, then the engine, in each)")
    print(f"{'round':<6} {'routing':<8} {'FusionBench img/s':>18} {'engine img/s':>13} {'speed-up':>9} "
          f"{'FB peak MiB':>12} {'engine peak MiB':>16} {'memory ratio':>13}")
    ratios = {"sample": [], "batch": []}
    for r in range(args.rounds):
        fb = subprocess.run([sys.executable, __file__, "--child", "--images", str(args.images), "--experts",
                             str(args.experts), "--precision", args.precision, "--patch", str(args.patch)], capture_output=True, text=True,
                            check=True)
        theirs = json.loads(fb.stdout.strip().splitlines()[-1])
        for mode in ("sample", "batch"):
            out = os.path.join(folder, f"embed_{mode}.safetensors")
            _, peak, err = run_engine([engine, "embed", "--model", moe, "--images", pixels, "--out", out,
                                       "--routing", mode, "--batch-size", str(args.images), "--device", "cpu",
                                       "--precision", args.precision])
            ours = float(re.search(r"([0-9.]+) images/s", err).group(1))
            load = float(re.search(r"loaded in ([0-9.]+) s", err).group(1))
            t = theirs[mode]
            speed, memory = ours / t["images_per_s"], peak / t["peak_mib"]
            ratios[mode].append((speed, memory))
            print(f"{r + 1:<6} {mode:<8} {t['images_per_s']:>18.2f} {ours:>13.2f} {speed:>8.2f}x "
                  f"{t['peak_mib']:>12.0f} {peak:>16.0f} {memory:>13.2f}   (engine load {load:.1f} s)", flush=True)
    for mode, rs in ratios.items():
        # The true median: with an even number of rounds, the mean of the middle two.
        speeds, memories = [s for s, _ in rs], [m for _, m in rs]
        print(f"median over rounds, {mode}: speed-up {statistics.median(speeds):.2f}x "
              f"(range {min(speeds):.2f}-{max(speeds):.2f}x), memory ratio {statistics.median(memories):.2f}")


if __name__ == "__main__":
    main()
