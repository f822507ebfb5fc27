#!/usr/bin/env python3
"""TIES-merging fixtures of tests/fixtures/ties/, merged by FusionBench's own TiesMergingAlgorithm.

Run once (tools/setup-venv.sh first, then tools/make_wemoe_fixtures.py, whose models it reads):
    .venv/bin/python tools/make_ties_fixtures.py
Deterministic from the seeds below; the tests never need Python.

- expected_default.safetensors: the state dict FusionBench's TiesMergingAlgorithm (scaling_factor 0.3,
  threshold 20, merge_func sum, remove_keys [], its config's defaults) makes of tests/fixtures/wemoe's
  pretrained model and its experts red, green and blue, whose task vectors are continuous.
- grid/pretrained, grid/{red,green,blue}: a smaller CLIPVisionModel whose weights are multiples of 2^-10 and
  whose task vectors are small multiples of 2^-10, so that the arithmetic is exact and TIES's edge cases are
  common: many magnitudes equal to the k-th smallest (all of them kept), parameters whose trimmed entries cancel
  exactly (the majority sign decides), parameters with every entry trimmed, pretrained weights of -0.0.
- grid_{sum_20,mean_20,max_20,sum_0.6}.safetensors: FusionBench's merges of the grid models for each merge
  function at threshold 20 (a percentage), and for sum at 0.6 (a fraction, as FusionBench reads values up to 1).
"""
import copy
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "ties")
EXPERTS = ["red", "green", "blue"]
STEP = 2.0 ** -10


def ties(pretrained, experts, threshold, merge_func):
    """FusionBench's TiesMergingAlgorithm.run on {"_pretrained_": ..., name: expert, ...}."""
    algorithm = TiesMergingAlgorithm(scaling_factor=0.3, threshold=threshold, remove_keys=[], merge_func=merge_func)
    pool = {"_pretrained_": copy.deepcopy(pretrained)}
    pool.update({name: copy.deepcopy(e) for name, e in zip(EXPERTS, experts)})
    merged = algorithm.run(pool)
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}


def grid_models():
    cfg = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, num_attention_heads=2, intermediate_size=24,
                           num_hidden_layers=1, hidden_act="quick_gelu")
    g = torch.Generator().manual_seed(600)
    base = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.round(torch.randn(p.shape, generator=g) * 100) * STEP)
    experts = []
    for i in range(len(EXPERTS)):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.round(torch.randn(p.shape, generator=g) * 1.2) * STEP)
        experts.append(e)
    return base, experts


def edge_cases(base, experts, threshold):
    """How often the k-th magnitude repeats, how often trimmed entries cancel exactly and how many pretrained
    weights are -0.0 (where an empty sum's sign shows), as a check that the grid exercises them."""
    ptm = torch.cat([p.reshape(-1) for _, p in sorted(base.state_dict().items())])
    taus = torch.stack([torch.cat([p.reshape(-1) for _, p in sorted(e.state_dict().items())]) - ptm for e in experts])
    d = taus.shape[1]
    k = d - int(d * threshold / 100)
    kth = taus.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = taus * (taus.abs() >= kth)
    cancel = ((trimmed.sum(0) == 0) & (trimmed != 0).any(0)).sum().item()
    ties_at_kth = (taus.abs() == kth).sum().item()
    negative_zeros = ((ptm == 0) & torch.signbit(ptm)).sum().item()
    return ties_at_kth, cancel, negative_zeros


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    wemoe = os.path.join(FIXTURES, "wemoe")
    pretrained = CLIPVisionModel.from_pretrained(os.path.join(wemoe, "pretrained")).eval()
    experts = [CLIPVisionModel.from_pretrained(os.path.join(wemoe, n)).eval() for n in EXPERTS]
    save_file(ties(pretrained, experts, 20, "sum"), os.path.join(ROOT, "expected_default.safetensors"))

    base, grid = grid_models()
    base.save_pretrained(os.path.join(ROOT, "grid", "pretrained"))
    for name, e in zip(EXPERTS, grid):
        e.save_pretrained(os.path.join(ROOT, "grid", name))
    ties_at_kth, cancel, negative_zeros = edge_cases(base, grid, 20)
    print(f"grid at threshold 20: {ties_at_kth} magnitudes equal to the k-th, {cancel} parameters cancelling, "
          f"{negative_zeros} pretrained weights of -0.0")
    assert ties_at_kth > len(EXPERTS) and cancel > 0 and negative_zeros > 0, \
        "the grid no longer exercises TIES's edge cases"
    for threshold, func in ((20, "sum"), (20, "mean"), (20, "max"), (0.6, "sum")):
        save_file(ties(base, grid, threshold, func), os.path.join(ROOT, f"grid_{func}_{threshold}.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ROOT) for n in ns)
    print(f"fixtures in {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
