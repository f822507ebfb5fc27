#!/usr/bin/env python3
"""Test-time adaptation fixtures of tests/fixtures/adapt/, from torch autograd through FusionBench's module.

Run after tools/make_wemoe_fixtures.py (tools/setup-venv.sh first): .venv/bin/python tools/make_adapt_fixtures.py

The WEMoE model is tests/fixtures/wemoe/fusionbench_d2 loaded into FusionBench's WeightEnsemblingMoE (built as
that fixture was built). Two tasks, "left" (3 classes) and "right" (4 classes), 4 unlabeled images each, heads
with their own projection. The loss is FusionBench's: the sum over tasks of
fusion_bench.method.we_moe.entropy_loss(logits) (softmax, log(p + 1e-8), mean over the batch); only the routers
train. expected.safetensors holds, for per-sample (batch_reduce=False) and batch (True) routing:
  {mode}.loss                      the loss at the fixture's routers
  {mode}.grad.<router tensor>      its gradient for every router tensor (FusionBench's unprefixed names)
  {mode}.adam5.<router tensor>     the router tensors after 5 full-batch Adam steps (lr 1e-4, betas 0.9/0.999,
                                   eps 1e-8), FusionBench's optimizer settings
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusionbench_losses  # noqa: E402
from make_wemoe_fixtures import EXPERTS, construct_moe_model  # noqa: E402


entropy_loss = fusionbench_losses.entropy_loss("we_moe")

WEMOE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "wemoe")
ROOT = os.path.join(os.path.dirname(WEMOE), "adapt")


def load_moe():
    base = CLIPVisionModel.from_pretrained(os.path.join(WEMOE, "pretrained")).eval()
    experts = [CLIPVisionModel.from_pretrained(os.path.join(WEMOE, n)).eval() for n in EXPERTS]
    moe = construct_moe_model(base, experts, 2)
    moe.load_state_dict(load_file(os.path.join(WEMOE, "fusionbench_d2", "model.safetensors")))
    moe.requires_grad_(False)
    for layer in moe.encoder.layers:
        layer.mlp.gate.requires_grad_(True)
    return moe


def main():
    os.makedirs(ROOT, exist_ok=True)
    g = torch.Generator().manual_seed(600)
    d, p = 32, 8
    projection = torch.randn(p, d, generator=g) / d ** 0.5
    heads = {"left": F.normalize(torch.randn(3, p, generator=g), dim=-1),
             "right": F.normalize(torch.randn(4, p, generator=g), dim=-1)}
    # A moderate scale: at 100 these tiny random models give saturated softmaxes and vanishing gradients.
    scale = torch.tensor(5.0).log()
    save_file({"head.left": heads["left"], "head.right": heads["right"], "visual_projection.weight": projection,
               "logit_scale": scale}, os.path.join(ROOT, "heads.safetensors"))
    data = {}
    for task in ("left", "right"):
        data[task] = torch.randn(4, 3, 24, 24, generator=g)
        save_file({"pixel_values": data[task].contiguous()}, os.path.join(ROOT, f"{task}.safetensors"))

    expected = {}
    for mode, reduce in (("sample", False), ("batch", True)):
        moe = load_moe()
        for layer in moe.encoder.layers:
            layer.mlp.batch_reduce = reduce
        routers = {n: q for n, q in moe.named_parameters() if q.requires_grad}

        def loss_fn():
            total = 0
            for task, pixels in data.items():
                pooled = moe(pixel_values=pixels).pooler_output
                embeds = F.normalize(pooled @ projection.T, dim=-1)
                total = total + entropy_loss(scale.exp() * embeds @ heads[task].T)
            return total

        loss = loss_fn()
        loss.backward()
        expected[f"{mode}.loss"] = loss.detach().reshape(1)
        for n, q in routers.items():
            expected[f"{mode}.grad.{n}"] = q.grad.detach().clone().contiguous()
        optimizer = torch.optim.Adam(list(routers.values()), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        optimizer.zero_grad()
        for _ in range(5):
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        for n, q in routers.items():
            expected[f"{mode}.adam5.{n}"] = q.detach().clone().contiguous()
        print(f"{mode}: loss {expected[f'{mode}.loss'].item():.6f}, {len(routers)} router tensors")
    save_file(expected, os.path.join(ROOT, "expected.safetensors"))
    total = sum(os.path.getsize(os.path.join(ROOT, n)) for n in os.listdir(ROOT))
    print(f"fixtures in {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
