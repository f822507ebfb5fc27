#!/usr/bin/env python3
"""AdaMerging fixtures of tests/fixtures/adamerging/, from FusionBench's own LayerWiseMergedModel and
TaskWiseMergedModel.

Run after tools/make_wemoe_fixtures.py and tools/make_adapt_fixtures.py (tools/setup-venv.sh first):
    .venv/bin/python tools/make_adamerging_fixtures.py
Deterministic; the tests never need Python.

The models are tests/fixtures/wemoe's pretrained CLIPVisionModel and its experts red, green and blue; the tasks
are tests/fixtures/adapt's "left" and "right" (4 unlabeled images each, heads with their own projection and
logit scale). FusionBench's CLIPLayerWiseAdaMergingAlgorithm at its config's defaults (adamerging/clip.yaml:
init_values 0.3, clamp_weights false, tie_weights true, strict false, Adam lr 1e-3) wraps them in
LayerWiseMergedModel; the loss is the sum over tasks of its adamerging entropy_loss of the logits
(logit_scale.exp() · normalize(projection(pooler_output)) · headᵀ), as its compute_logits gives them. The
batches are whole tasks (4 images, under the default batch of 16), so every step sees the same images.

expected.safetensors:
  loss              the loss at the initial coefficients
  grad              its gradient with respect to merge_weight [T, P]
  adam5             merge_weight after 5 steps of FusionBench's loop (a backward per task, one Adam step,
                    merge_weights)
  merged.<name>     the model merge_and_unload gives after those steps, by the checkpoint's names
  task.loss, task.grad, task.adam5, task.merged.<name>
                    the same for task-wise AdaMerging (CLIPTaskWiseAdaMergingAlgorithm, the same config):
                    TaskWiseMergedModel, one coefficient per expert, merge_weight [T]
metadata "parameters": the P parameter names of merge_weight's columns, in order.
"""
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel, get_task_wise_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusionbench_losses  # noqa: E402
from make_wemoe_fixtures import EXPERTS  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
WEMOE = os.path.join(FIXTURES, "wemoe")
ADAPT = os.path.join(FIXTURES, "adapt")
ROOT = os.path.join(FIXTURES, "adamerging")
TASKS = ["left", "right"]


entropy_loss = fusionbench_losses.entropy_loss("adamerging")


def checkpoint_name(name):
    return name if name.startswith("vision_model.") else f"vision_model.{name}"


def main():
    os.makedirs(ROOT, exist_ok=True)
    base = CLIPVisionModel.from_pretrained(os.path.join(WEMOE, "pretrained")).eval()
    experts = [CLIPVisionModel.from_pretrained(os.path.join(WEMOE, n)).eval() for n in EXPERTS]
    heads = load_file(os.path.join(ADAPT, "heads.safetensors"))
    projection, scale = heads["visual_projection.weight"], heads["logit_scale"].exp()
    data = {t: load_file(os.path.join(ADAPT, f"{t}.safetensors"))["pixel_values"] for t in TASKS}

    names = [n for n, p in base.named_parameters() if p.requires_grad]
    expected = {}
    for prefix, wrapper, weights in [
        ("", LayerWiseMergedModel, get_layer_wise_weights(num_models=len(experts), num_layers=len(names), init_values=0.3)),
        ("task.", TaskWiseMergedModel, get_task_wise_weights(num_models=len(experts), init_values=0.3)),
    ]:
        module = wrapper(
            weights,
            pretrained_model=copy.deepcopy(base),
            finetuned_models=[copy.deepcopy(e) for e in experts],
            clamp_weights=False,
            tie_weights=True,
            strict=False,
        )

        def task_loss(task):
            pooled = module(data[task])[1]
            embeds = F.normalize(pooled @ projection.T, dim=-1)
            return entropy_loss(scale * embeds @ heads[f"head.{task}"].T)

        module.merge_weights()
        losses = [task_loss(t) for t in TASKS]
        loss = sum(losses)
        loss.backward()
        expected[f"{prefix}loss"] = loss.detach().reshape(1)
        expected[f"{prefix}grad"] = module.merge_weight.grad.detach().clone()
        module.merge_weight.grad = None

        # FusionBench's test_time_adaptation loop, 5 steps.
        optimizer = torch.optim.Adam([module.merge_weight], lr=1e-3)
        module.merge_weights()
        for _ in range(5):
            for task in TASKS:
                task_loss(task).backward(retain_graph=True)
            optimizer.step()
            optimizer.zero_grad()
            module.merge_weights()
        expected[f"{prefix}adam5"] = module.merge_weight.detach().clone()
        merged = module.merge_and_unload()
        for n, p in merged.state_dict().items():
            if p.dtype == torch.float32:
                expected[f"{prefix}merged.{checkpoint_name(n)}"] = p.detach().clone().contiguous()
        print(f"{prefix or 'layer.'}loss {loss.item():.6f}, |grad| {expected[f'{prefix}grad'].norm():.4e}, "
              f"adam5 {expected[f'{prefix}adam5'].flatten()[:3].tolist()}")

    meta = {"parameters": json.dumps([checkpoint_name(n) for n in names])}
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(ROOT, "expected.safetensors"), meta)
    print(f"{len(names)} parameter tensors")
    total = sum(os.path.getsize(os.path.join(ROOT, n)) for n in os.listdir(ROOT))
    print(f"fixtures in {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
