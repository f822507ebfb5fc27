#!/usr/bin/env python3
"""Why adaptation does or does not find the routing, on a suite made by tools/build_suite.py (BENCHMARKS.md, the
demo section). Merges in PyTorch the way WEMoE's routing would: every parameter outside the MLPs by task
arithmetic (λ 0.3), the MLPs with fixed coefficients per task. Prints, per task (mean entropy / accuracy):

  1. the entropy matrix: each task with its MLPs routed wholly to each single expert;
  2. fixed routings: task arithmetic, the oracle (own expert), coefficient 1.0 for every expert;
  3. group swaps: the oracle with the task's own expert also for attention, LayerNorms, embeddings or all of them;
  4. layer swaps: the oracle with one layer's MLP routed to another expert, per layer the lowest-entropy such
     expert: where one is below the oracle's entropy, the oracle is not a local minimum of the adaptation's loss;
     with the spread of the unit image embeddings (their mean distance from their mean), which a collapse shrinks.

    .venv/bin/python tools/suite_diagnostics.py [assets/suite]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_suite import layer_index, pixels  # noqa: E402

LAMBDA = 0.3


def group(key):
    if ".mlp." in key:
        return "mlp"
    if "self_attn" in key:
        return "attn"
    if "layer_norm" in key or "post_layernorm" in key:
        return "ln"
    return "emb"


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "assets", "suite")
    tasks = [t["name"] for t in json.load(open(os.path.join(root, "suite.json")))["tasks"]]
    heads = load_file(os.path.join(root, "heads.safetensors"))
    model = CLIPVisionModelWithProjection.from_pretrained(os.path.join(root, "pretrained")).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for t in tasks:
        sd = load_file(os.path.join(root, "experts", t, "model.safetensors"))
        experts.append({k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()})
    data = {t: load_file(os.path.join(root, "data", f"{t}.safetensors")) for t in tasks}
    T = len(tasks)

    def merged(mlp, own_groups=(), t=None):
        """MLPs with coefficients `mlp` (one list for every layer, or one per layer); groups in `own_groups` from
        expert t; the rest task arithmetic."""
        sd = {}
        for k, v in base.items():
            if k not in experts[0]:
                sd[k] = v
            elif group(k) in own_groups:
                sd[k] = experts[t][k]
            else:
                c = [LAMBDA] * T
                if group(k) == "mlp":
                    c = mlp[layer_index(k)] if isinstance(mlp[0], list) else mlp
                sd[k] = v + sum(c[i] * (experts[i][k] - v) for i in range(T))
        return sd

    def score(sd, t):
        """Mean entropy, accuracy, and the spread of the unit embeddings (mean distance from their mean)."""
        model.load_state_dict(sd)
        with torch.no_grad():
            emb = F.normalize(model(pixel_values=pixels(data[tasks[t]]["images"].numpy())).image_embeds, dim=-1)
        p = (heads["logit_scale"].exp() * emb @ heads[f"head.{tasks[t]}"].T).softmax(-1)
        entropy = -(p * (p + 1e-8).log()).sum(-1).mean().item()
        spread = (emb - emb.mean(0)).norm(dim=-1).mean().item()
        return entropy, p.argmax(-1).eq(data[tasks[t]]["labels"]).float().mean().item(), spread

    def one_hot(t):
        return [1.0 if i == t else 0.0 for i in range(T)]

    def row(name, results):
        cells = " ".join(f"{e:.2f}/{100 * a:3.0f}" for e, a, _ in results)
        print(f"{name:16s} {cells}  entropy sum {sum(e for e, _, _ in results):.2f}, "
              f"accuracy {100 * sum(a for _, a, _ in results) / len(results):.1f}", flush=True)

    print("1. entropy / accuracy of each task (row) with its MLPs routed to each expert (column):", " ".join(tasks))
    for t in range(T):
        row(tasks[t], [score(merged(one_hot(k)), t) for k in range(T)])
    print("2. fixed routings, per task:", " ".join(tasks))
    row("task arithmetic", [score(merged([LAMBDA] * T), t) for t in range(T)])
    row("oracle", [score(merged(one_hot(t)), t) for t in range(T)])
    row("every expert 1.0", [score(merged([1.0] * T), t) for t in range(T)])
    print("3. the oracle with the task's own expert also for:", " ".join(tasks))
    for own in [("attn",), ("ln",), ("emb",), ("attn", "ln", "emb")]:
        row("+".join(own), [score(merged(one_hot(t), own, t), t) for t in range(T)])
    layers = model.config.num_hidden_layers
    print("4. the oracle with one layer's MLP routed to another expert: per layer, the lowest-entropy such expert",
          "(entropy/accuracy/spread of the unit embeddings)")
    for t in range(T):
        entropy, acc, spread = score(merged(one_hot(t)), t)
        cells = []
        for layer in range(layers):
            (e, a, sp), k = min(
                (score(merged([one_hot(k) if j == layer else one_hot(t) for j in range(layers)]), t), k)
                for k in range(T) if k != t
            )
            cells.append(f"L{layer} {tasks[k]:8s} {e:.2f}/{100 * a:3.0f}/{sp:.2f}{' <' if e < entropy else '  '}")
        print(f"{tasks[t]:9s} oracle {entropy:.2f}/{100 * acc:3.0f}/{spread:.2f} | " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
