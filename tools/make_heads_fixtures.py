#!/usr/bin/env python3
"""Makes tests/fixtures/heads_tool/: a tiny full CLIPModel with a tiny BPE tokenizer, the heads file
tools/make_heads.py writes for it, and FusionBench's logits with those heads, so that a test checks that the
engine reads what the tool writes as FusionBench's classifier means it.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_heads_fixtures.py
Deterministic; the tests never need Python.

- clip/: `CLIPModel` (text tower: 1 layer, width 32; vision tower: image 32, patch 8, width 48, 2 layers;
  projection 24) with a CLIP tokenizer of characters and a few merges (vocab.json, merges.txt);
- heads.safetensors: `tools/make_heads.py --task mnist --task photos=tests/fixtures/photos
  --task pets=tests/fixtures/parquet/two_shards` (a FusionBench task, an ImageFolder, a parquet dataset);
- expected.safetensors: `pixel_values` [5, 3, 32, 32] and `logits.<task>`, FusionBench's
  `HFCLIPClassifier.forward` on them with each task's classification set;
- mnist.json, dtd.json: FusionBench's class names and templates of those tasks, as
  `tools/fusionbench_classes.py` writes them, from which `wemoe-engine heads` makes the same heads;
- dtd.safetensors: `head.dtd`, FusionBench's zero-shot weights for dtd (47 classes × 8 templates: prompts of
  many lengths, averaged over templates);
- clip_deep/ and clip_deep_dtd.safetensors: a second CLIPModel whose text tower has 3 layers of 4 heads and
  GELU, with `eos_token_id` 2 as OpenAI's checkpoints have it (transformers then pools at the largest id), and
  its head.dtd: with more than one layer, a prompt's pooled output depends on the causal mask.
"""
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from fusion_bench.models.hf_clip import HFCLIPClassifier
from fusion_bench.tasks.clip_classification import get_classnames_and_templates

TOOLS = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(TOOLS, "..", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "heads_tool")
TASKS = {"mnist": "mnist", "photos": os.path.join(FIXTURES, "photos"),
         "pets": os.path.join(FIXTURES, "parquet", "two_shards")}
# The data tasks' classes as their makers named them (the photos' folders; make_parquet_fixtures.py's ClassLabel).
KNOWN_CLASSES = {"photos": ["class_0", "class_1"], "pets": ["cat", "dog", "fish"]}


def write_tokenizer(path):
    """Characters (each also as a word's last, `</w>`), a few merges, and CLIP's two special tokens."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789\"':.,-_")
    merges = [("p", "h"), ("ph", "o"), ("o", "t"), ("t", "o</w>"), ("o", "f</w>"), ("a", "s")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
    return vocab


def save_clip(path, text, vision, logit_scale, seed):
    """A CLIPModel with the tokenizer above, `text`'s and `vision`'s dimensions and projection 24, its weights
    widened by seeded noise (so that class embeddings and logits differ visibly); returns the vocabulary."""
    os.makedirs(path)
    vocab = write_tokenizer(path)
    eos = vocab["<|endoftext|>"]
    text = {**dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
            **text}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, logit_scale_init_value=logit_scale)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return vocab


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    clip_dir = os.path.join(ROOT, "clip")
    vocab = save_clip(clip_dir, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=77),
                      dict(image_size=32, patch_size=8, hidden_size=48, num_attention_heads=4, intermediate_size=80,
                           num_hidden_layers=2), 2.9, 7)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    assert tokenizer("a photo of")["input_ids"][0] == vocab["<|startoftext|>"]

    heads = os.path.join(ROOT, "heads.safetensors")
    subprocess.run([sys.executable, os.path.join(TOOLS, "make_heads.py"), "--clip", clip_dir, "--out", heads]
                   + [a for name, src in TASKS.items() for a in ("--task", f"{name}={src}" if src != name else name)],
                   check=True)

    # FusionBench's classifier, set up for each task as its CLIP task pools set it up.
    classifier = HFCLIPClassifier(CLIPModel.from_pretrained(clip_dir).eval(), tokenizer)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(5, 3, 32, 32, generator=g)
    expected = {"pixel_values": pixels}
    for name in TASKS:
        if name == "mnist":
            names, templates = get_classnames_and_templates("mnist")
        else:
            names, templates = KNOWN_CLASSES[name], [lambda c: f"a photo of a {c}"]
        classifier.set_classification_task(names, templates)
        with torch.no_grad():
            expected[f"logits.{name}"] = classifier(pixels).contiguous()
    save_file(expected, os.path.join(ROOT, "expected.safetensors"))
    sys.path.insert(0, TOOLS)
    from fusionbench_classes import task_json

    for task in ("mnist", "dtd"):
        with open(os.path.join(ROOT, f"{task}.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(task_json(task), ensure_ascii=False, indent=1) + "\n")
    classifier.set_classification_task(*get_classnames_and_templates("dtd"))
    save_file({"head.dtd": classifier.zeroshot_weights.contiguous()}, os.path.join(ROOT, "dtd.safetensors"))

    deep_dir = os.path.join(ROOT, "clip_deep")
    save_clip(deep_dir, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=40, hidden_act="gelu", eos_token_id=2),
              dict(image_size=16, patch_size=8, hidden_size=16, num_attention_heads=2, intermediate_size=16,
                   num_hidden_layers=1), 2.5, 8)
    classifier = HFCLIPClassifier(CLIPModel.from_pretrained(deep_dir).eval(), AutoTokenizer.from_pretrained(deep_dir))
    classifier.set_classification_task(*get_classnames_and_templates("dtd"))
    save_file({"head.dtd": classifier.zeroshot_weights.contiguous()},
              os.path.join(ROOT, "clip_deep_dtd.safetensors"))
    print({k: tuple(v.shape) for k, v in expected.items()})


if __name__ == "__main__":
    main()
