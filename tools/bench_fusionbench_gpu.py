#!/usr/bin/env python3
"""FusionBench's WeightEnsemblingMoE (one ViT-B/32 MLP layer: 768 -> 3072 -> 768, 8 experts, router depth 2) on the
GPU with PyTorch, per-sample and batch-reduced, at the shapes of benches/gpu.rs; CUDA events, warm-up, medians.
tools/gpu-check.sh runs it beside the engine's kernel benchmarks so the two compare on the same card in one run.

    python3 tools/bench_fusionbench_gpu.py

Needs torch (CUDA), transformers and the fusion-bench package (installed without its dependencies: only its
WEMoE module is imported, without running the package's heavy __init__).
"""
import importlib.util
import statistics
import sys
import types


def import_we_moe():
    """fusion_bench.models.we_moe without executing fusion_bench/__init__.py (which imports its whole stack)."""
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None:
        sys.exit("fusion-bench is not installed (pip install --no-deps fusion-bench)")
    root = spec.submodule_search_locations[0]
    for name, sub in (("fusion_bench", ""), ("fusion_bench.models", "/models"), ("fusion_bench.utils", "/utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [root + sub]
        sys.modules[name] = pkg
    import fusion_bench.models.we_moe as we_moe  # noqa: E402
    return we_moe.WeightEnsemblingMoE


def main():
    import copy
    import torch
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPMLP

    moe_class = import_we_moe()
    torch.manual_seed(0)
    device = torch.device("cuda")
    config = CLIPVisionConfig()  # ViT-B/32: hidden 768, intermediate 3072, quick_gelu
    base = CLIPMLP(config)
    experts = []
    for _ in range(8):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.1 * p.abs().mean() * torch.randn_like(p))
        experts.append(e)
    moe = moe_class(hidden_size=768, base_model=base, expert_models=experts, init_lambda=0.3, batch_first=True,
                    router_hidden_layers=2, batch_reduce=False).to(device).eval()
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32})")
    print("| shape | variant | median ms |\n| --- | --- | ---: |")
    for tokens, batch in ((50, 16), (50, 64), (197, 16), (197, 64)):
        x = torch.randn(batch, tokens, 768, device=device)
        for mode, reduce in (("per-sample", False), ("batch-reduced", True)):
            moe.batch_reduce = reduce
            times = []
            with torch.no_grad():
                for i in range(3 + 15):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    moe(x)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 3:
                        times.append(start.elapsed_time(end))
            print(f"| B={batch} N={tokens} | FusionBench WEMoE layer (router + MLP), {mode} "
                  f"| {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
