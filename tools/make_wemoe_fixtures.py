#!/usr/bin/env python3
"""WEMoE fixtures of tests/fixtures/wemoe/, made with FusionBench's own module.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_wemoe_fixtures.py
Deterministic from the seeds below; the tests never need Python.

- pretrained/, red/, green/, blue/: a small CLIPVisionModel (image 24, patch 8, 10 tokens, width 32, 2 heads,
  MLP 48, 2 layers, quick_gelu) and three "fine-tuned" copies (every parameter moved by a seeded perturbation),
  saved by transformers.
- fusionbench_d{0,1,2}/: the WEMoE model built as FusionBench's CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model
  builds it (task arithmetic with init_lambda 0.3, then every layer's MLP replaced by
  fusion_bench.models.we_moe.WeightEnsemblingMoE with batch_first=True), router depth 0, 1 and 2, with the
  routers re-drawn large enough that samples route differently; saved as FusionBench's state dict
  (safetensors) with a plain CLIPVisionModel config.json: the layout FusionBench itself saves.
- expected.safetensors: for each depth and routing mode (per sample: batch_reduce False; batch: True), the
  pooler_output on pixels.safetensors and the routing weights FusionBench used, [layers, images, experts].
- fusionbench_init_d2.safetensors: FusionBench's freshly initialised depth-2 routers (before the re-draw),
  for comparing our initialisation's statistics.
"""
import copy
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.models.we_moe import WeightEnsemblingMoE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import randomize  # noqa: E402  (the same initialisation as the CLIP fixtures)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "wemoe")
EXPERTS = ["red", "green", "blue"]
LAMBDA = 0.3


def fine_tune(model, seed):
    """A copy with every parameter moved, as fine-tuning would (10-30% of the parameter's scale)."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m.eval()


def task_arithmetic_merge(pretrained, finetuned, scaling_factor):
    """FusionBench's task_arithmetic_merge, the same arithmetic in the same order: the task vectors summed in
    expert order, scaled, added to the pretrained weights. (Its 0.2.33 implementation refuses state dicts of
    nn.Parameters in a type check of state_dict_add, so it cannot be called on these models directly.)"""
    with torch.no_grad():
        theta0 = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
        total = None
        for m in finetuned:
            tv = {k: v.detach() - theta0[k] for k, v in m.state_dict().items()}
            total = tv if total is None else {k: total[k] + tv[k] for k in total}
        pretrained.load_state_dict({k: theta0[k] + total[k] * scaling_factor for k in theta0})
    return pretrained


def construct_moe_model(base, experts, depth):
    """fusion_bench CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model, for a transformers-5 CLIPVisionModel
    (whose encoder is `model.encoder`, not `model.vision_model.encoder`)."""
    experts = [copy.deepcopy(e) for e in experts]
    moe = task_arithmetic_merge(copy.deepcopy(base), experts, scaling_factor=LAMBDA).requires_grad_(False)
    for i, layer in enumerate(moe.encoder.layers):
        layer.mlp = WeightEnsemblingMoE(
            hidden_size=base.config.hidden_size,
            base_model=copy.deepcopy(base.encoder.layers[i].mlp),
            expert_models=[e.encoder.layers[i].mlp for e in experts],
            init_lambda=LAMBDA,
            batch_first=True,
            router_hidden_layers=depth,
            batch_reduce=False,
        )
    return moe.eval()


def redraw_routers(moe, depth, seed):
    g = torch.Generator().manual_seed(seed)
    d = moe.config.hidden_size
    with torch.no_grad():
        for layer in moe.encoder.layers:
            gate = layer.mlp.gate
            if depth == 0:
                gate.weight.copy_(torch.tensor([0.2, 0.5, 0.9]) + 0.1 * torch.randn(3, generator=g))
            elif depth == 1:
                gate.fc.weight.copy_(torch.randn(gate.fc.weight.shape, generator=g) / d ** 0.5)
                gate.fc.bias.copy_(LAMBDA + 0.2 * torch.randn(gate.fc.bias.shape, generator=g))
            else:
                gate.fc1.weight.copy_(torch.randn(gate.fc1.weight.shape, generator=g) / d ** 0.5)
                gate.fc1.bias.copy_(0.3 * torch.randn(gate.fc1.bias.shape, generator=g))
                gate.fc2.weight.copy_(2.0 * torch.randn(gate.fc2.weight.shape, generator=g) / d ** 0.5)
                gate.fc2.bias.copy_(LAMBDA + 0.2 * torch.randn(gate.fc2.bias.shape, generator=g))


def run(moe, pixels, batch_reduce):
    """pooler_output and the routing weights FusionBench used, [layers, images, experts]."""
    captured = []

    def hook(module, args, output):
        w = output if output.dim() == 1 else output.mean(dim=1)
        if output.dim() == 1:
            w = w.expand(pixels.shape[0], -1)
        elif batch_reduce:
            w = w.mean(dim=0, keepdim=True).expand(pixels.shape[0], -1)
        captured.append(w.detach().clone())

    handles = []
    for layer in moe.encoder.layers:
        layer.mlp.batch_reduce = batch_reduce
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        pooled = moe(pixel_values=pixels).pooler_output
    for h in handles:
        h.remove()
    return pooled.contiguous(), torch.stack(captured).contiguous()


def save_model(moe, path):
    os.makedirs(path)
    moe.config.save_pretrained(path)
    state = {k: v.detach().clone().contiguous() for k, v in moe.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    cfg = CLIPVisionConfig(image_size=24, patch_size=8, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                           num_hidden_layers=2, hidden_act="quick_gelu", projection_dim=16)
    base = randomize(CLIPVisionModel(cfg), 100)
    experts = [fine_tune(base, 200 + i) for i in range(len(EXPERTS))]
    base.save_pretrained(os.path.join(ROOT, "pretrained"))
    for name, e in zip(EXPERTS, experts):
        e.save_pretrained(os.path.join(ROOT, name))

    pixels = torch.randn(5, 3, 24, 24, generator=torch.Generator().manual_seed(300))
    save_file({"pixel_values": pixels.contiguous()}, os.path.join(ROOT, "pixels.safetensors"))
    expected = {}
    for depth in (0, 1, 2):
        torch.manual_seed(400 + depth)
        moe = construct_moe_model(base, experts, depth)
        if depth == 2:
            init = {k: v.detach().clone().contiguous() for k, v in moe.state_dict().items() if ".gate." in k}
            save_file(init, os.path.join(ROOT, "fusionbench_init_d2.safetensors"))
        redraw_routers(moe, depth, 500 + depth)
        save_model(moe, os.path.join(ROOT, f"fusionbench_d{depth}"))
        for mode, reduce in (("sample", False), ("batch", True)):
            pooled, routing = run(moe, pixels, reduce)
            expected[f"d{depth}.{mode}.pooler_output"] = pooled
            expected[f"d{depth}.{mode}.routing_weights"] = routing
        spread = expected[f"d{depth}.sample.routing_weights"].std(dim=1).mean().item()
        print(f"depth {depth}: per-sample spread of routing weights {spread:.3f}")
    save_file(expected, os.path.join(ROOT, "expected.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ROOT) for n in ns)
    print(f"fixtures in {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
