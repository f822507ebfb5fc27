#!/usr/bin/env python3
"""Zero-shot heads for FusionBench's eight TA8 tasks, side by side: tools/make_heads.py (FusionBench's
`HFCLIPClassifier` on PyTorch) against `wemoe-engine heads`, on a ViT-B/32-shaped CLIPModel with random weights
(transformers' initialisation, seeded) and CLIP's own tokenizer (OpenAI's merges from the open_clip_torch wheel,
as tools/make_tokenizer_fixtures.py builds them; `eos_token_id` 2 as OpenAI's checkpoints have it). Both
commands run whole (loading included), alternating round by round; the heads they write are compared, and the
engine's count of the tokens its text tower ran is printed.

    cargo build --release && .venv/bin/python tools/bench_heads_vs_fusionbench.py [--rounds 2] [--bpe FILE]

The model and the tasks' class lists are written once under tools/out/heads_b32/.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(TOOLS, "..")
OUT = os.path.join(TOOLS, "out", "heads_b32")
ENGINE = os.path.join(ROOT, "target", "release", "wemoe-engine")
TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def build_model(bpe):
    import gzip

    import torch
    from transformers import CLIPConfig, CLIPModel

    sys.path.insert(0, TOOLS)
    from make_tokenizer_fixtures import bytes_to_unicode, find_bpe, write_tokenizer

    clip = os.path.join(OUT, "clip")
    if os.path.exists(os.path.join(clip, "model.safetensors")):
        return clip
    os.makedirs(clip, exist_ok=True)
    data = open(bpe, "rb").read() if bpe else find_bpe()[0]
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    write_tokenizer(clip, vocab, merges)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(bos_token_id=0, eos_token_id=2, pad_token_id=1))  # OpenAI's ids
    CLIPModel(config).eval().save_pretrained(clip)
    return clip


def write_classes():
    sys.path.insert(0, TOOLS)
    from fusionbench_classes import task_json

    paths = {}
    for task in TASKS:
        paths[task] = os.path.join(OUT, f"{task}.json")
        with open(paths[task], "w", encoding="utf-8") as f:
            json.dump(task_json(task), f, ensure_ascii=False)
    return paths


def timed(command):
    """(seconds, stderr) of `command`."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])}...: {result.stderr}")
    return time.perf_counter() - start, result.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (default: from the open_clip_torch wheel)")
    args = parser.parse_args()
    clip = build_model(args.bpe)
    classes = write_classes()
    prompts = sum(len(json.load(open(p))["classes"]) * len(json.load(open(p))["templates"]) for p in classes.values())
    tmp = tempfile.mkdtemp()
    fb_out, engine_out = os.path.join(tmp, "fusionbench.safetensors"), os.path.join(tmp, "engine.safetensors")
    fusionbench = [sys.executable, os.path.join(TOOLS, "make_heads.py"), "--clip", clip, "--out", fb_out]
    fusionbench += [a for t in TASKS for a in ("--task", t)]
    engine = [ENGINE, "heads", "--clip", clip, "--out", engine_out]
    engine += [a for t in TASKS for a in ("--task", f"{t}={classes[t]}")]
    times = {"FusionBench": [], "engine": []}
    for r in range(args.rounds):
        order = [("FusionBench", fusionbench), ("engine", engine)]
        for name, command in order if r % 2 == 0 else order[::-1]:
            seconds, stderr = timed(command)
            times[name].append(seconds)
            print(f"round {r + 1}: {name} {seconds:.1f} s", flush=True)
            if name == "engine":
                counts = next(line for line in stderr.splitlines() if " prompts, " in line)

    from safetensors.torch import load_file

    a, b = load_file(fb_out), load_file(engine_out)
    worst = max(float((a[f"head.{t}"] - b[f"head.{t}"]).abs().max()) for t in TASKS)
    print(f"\n{len(TASKS)} tasks, {prompts} prompts, B/32 text tower (random weights), CLIP's tokenizer")
    print("| command | seconds (each round) | prompts/s |")
    print("| --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in t)} | {prompts / min(t):.0f} |")
    ratios = [f / e for f, e in zip(times["FusionBench"], times["engine"])]
    print(f"engine speed-up per round: {', '.join(f'{x:.1f}x' for x in ratios)}")
    print(f"largest |difference| of any head element: {worst:.2e}")
    print(f"engine: {counts}")


if __name__ == "__main__":
    main()
