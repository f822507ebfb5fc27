#!/usr/bin/env python3
"""Writes the zero-shot heads file that `wemoe-engine eval` and `adapt` take (`--heads`), computed as
FusionBench computes its zero-shot classification heads: for each class, the CLIP text tower's projected
embedding of every template filled with the class name, each L2-normalised, averaged, normalised again
(`fusion_bench.models.hf_clip.HFCLIPClassifier.set_classification_task`, which this script calls).

    .venv/bin/python tools/make_heads.py --clip path/to/clip-vit-base-patch32 \\
        --task sun397 --task stanford-cars --task mnist --out heads.safetensors

A task is NAME or NAME=SOURCE; the head is stored as `head.NAME`. SOURCE (NAME when absent) is one of
- a FusionBench task name (`mnist`, `sun397`, `stanford-cars`, `tanganke/gtsrb`, ...): FusionBench's class
  names and templates, as its CLIP task pools use them;
- a path: a text file with one class name per line, a JSON list of names, an ImageFolder directory (its class
  subfolders in the engine's order: sorted, hidden ones skipped), or a Hugging Face `datasets` parquet file,
  folder of one split's shards, or split prefix (`data/test`), whose `ClassLabel` names are taken (the
  feature named `label`, else the first by name, as the engine chooses its label column). Such tasks use
  the `--template`s given, else FusionBench's default `a photo of a {}`.
`--template` (repeatable; `{}` stands for the class name) replaces every task's templates.

The file also holds the CLIP model's `visual_projection.weight` and raw `logit_scale` (FusionBench's
classifier uses the pretrained model's), and in its metadata `classes`: a JSON object of each task's class
names in row order, by which `wemoe-engine eval` matches an ImageFolder's or a parquet dataset's classes to the
head's rows (a subset of the classes, or another order). The file is written under a temporary name and renamed.

Needs torch, transformers, safetensors, datasets and FusionBench, as tools/setup-venv.sh installs them. The CLIP
directory must be a full `CLIPModel` (text tower included) with its tokenizer files, or name the tokenizer's
folder with --tokenizer.
"""
import argparse
import glob
import json
import os
import re
import sys


def fail(message):
    print(f"make_heads.py: {message}", file=sys.stderr)
    sys.exit(1)


def parquet_shards(path):
    """The parquet files `path` names, as the engine reads them: a file, a folder's files, or a split prefix."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        if any(e.is_dir() for e in os.scandir(path)):
            return []  # class subfolders: an ImageFolder, as the engine reads it
        shards = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
        splits = {re.sub(r"-\d+-of-\d+\.parquet$", "", os.path.basename(s)) for s in shards
                  if re.search(r"-\d+-of-\d+\.parquet$", s)}
        if len(splits) > 1:
            fail(f"{path}: shards of several splits ({', '.join(sorted(splits))}); name one as {path}/<split>")
        return shards
    return sorted(glob.glob(glob.escape(path) + "-*.parquet"))


def parquet_class_names(path, shards):
    import pyarrow.parquet as pq

    metadata = pq.read_schema(shards[0]).metadata or {}
    if b"huggingface" not in metadata:
        fail(f"{path}: no `datasets` metadata, so no class names; list them in a text file instead")
    features = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {})
    labels = sorted(name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel")
    if not labels:
        fail(f"{path}: no ClassLabel feature, so no class names; list them in a text file instead")
    label = "label" if "label" in labels else labels[0]
    names = features[label].get("names")
    if not names:
        fail(f"{path}: the ClassLabel '{label}' has no names; list them in a text file instead")
    return names


def class_names_from_path(path):
    """Class names in the order of the data's label ids, from a list file, an ImageFolder or parquet."""
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail(f"{path}: expected a JSON list of class names")
        return names
    if os.path.isfile(path) and not path.endswith(".parquet"):
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    shards = parquet_shards(path)
    if shards:
        return parquet_class_names(path, shards)
    if os.path.isdir(path):
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    fail(f"{path}: not a file, ImageFolder directory or parquet dataset")


def template_fn(template):
    return lambda c: template.replace("{}", c)


def resolve(task, templates):
    """(name, source, class names, templates) of one --task."""
    name, _, source = task.partition("=")
    source = source or name
    if not name or not re.fullmatch(r"[^\s=]+", name):
        fail(f"--task {task}: expected NAME or NAME=SOURCE")
    if os.path.exists(source) or glob.glob(glob.escape(source) + "-*.parquet"):
        from fusion_bench.models.hf_clip import default_templates

        classes = class_names_from_path(source)
        chosen = templates or default_templates
    else:
        from fusion_bench.tasks.clip_classification import CLIPTemplateFactory, get_classnames_and_templates

        if source not in CLIPTemplateFactory.get_available_datasets():
            fail(f"--task {task}: '{source}' is neither a path nor a FusionBench task "
                 f"({', '.join(CLIPTemplateFactory.get_available_datasets())})")
        classes, fb_templates = get_classnames_and_templates(source)
        chosen = templates or fb_templates
    if not classes:
        fail(f"--task {task}: no class names in {source}")
    if len(set(classes)) != len(classes):
        fail(f"--task {task}: class names repeat in {source}")
    return name, source, list(classes), chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True,
                        help="a full CLIPModel directory (text tower and projection), or its hub name")
    parser.add_argument("--tokenizer", help="the tokenizer's directory, when not in --clip")
    parser.add_argument("--task", action="append", required=True, metavar="NAME[=SOURCE]")
    parser.add_argument("--template", action="append", metavar="TEXT",
                        help="a prompt with {} for the class name; repeat; replaces every task's templates")
    parser.add_argument("--device", default="cpu", help="torch device for the text tower (default cpu)")
    parser.add_argument("--out", required=True, help="the heads file to write (.safetensors)")
    args = parser.parse_args()

    for t in args.template or []:
        if "{}" not in t:
            fail(f"--template {t!r}: no {{}} for the class name")
    templates = [template_fn(t) for t in args.template] if args.template else None
    tasks = [resolve(t, templates) for t in args.task]
    names = [t[0] for t in tasks]
    if len(set(names)) != len(names):
        fail(f"a task name repeats: {', '.join(names)}")

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    from fusion_bench.models.hf_clip import HFCLIPClassifier

    if not os.path.exists(args.clip) and (os.path.isabs(args.clip) or args.clip.startswith(".")):
        fail(f"{args.clip}: no such directory")
    try:
        config = AutoConfig.from_pretrained(args.clip)
    except OSError as e:
        fail(f"{args.clip}: cannot load its config.json ({str(e).splitlines()[0]})")
    if config.model_type != "clip":
        fail(f"{args.clip}: a {config.model_type} checkpoint; heads need the full CLIPModel with its text tower "
             "(the pretrained model the experts were fine-tuned from, e.g. openai/clip-vit-base-patch32)")
    # transformers makes an empty tokenizer, silently, from a folder without the files. (A hub name, such as
    # openai/clip-vit-base-patch32, is left to transformers.)
    tokenizer_dir = args.tokenizer or args.clip
    has = lambda *names: all(os.path.isfile(os.path.join(tokenizer_dir, n)) for n in names)  # noqa: E731
    if os.path.isdir(tokenizer_dir) and not (has("tokenizer.json") or has("vocab.json", "merges.txt")):
        fail(f"{tokenizer_dir}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
             "name the folder that has them with --tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # As FusionBench's model pools load it (the checkpoint's dtype).
    model = CLIPModel.from_pretrained(args.clip).to(args.device).eval()
    classifier = HFCLIPClassifier(model, tokenizer)

    heads, classes = {}, {}
    for name, source, class_names, chosen in tasks:
        classifier.set_classification_task(class_names, chosen)
        heads[f"head.{name}"] = classifier.zeroshot_weights.float().cpu().contiguous()
        classes[name] = class_names
        print(f"{name:>20}  {len(class_names):>5} classes  {len(chosen):>3} templates  from {source}")
    heads["visual_projection.weight"] = model.visual_projection.weight.detach().float().cpu().contiguous()
    heads["logit_scale"] = model.logit_scale.detach().float().cpu().reshape(())
    tmp = f"{args.out}.tmp-{os.getpid()}"
    # One metadata key: safetensors writes its keys in hash order, and one key keeps the file's bytes stable.
    save_file(heads, tmp, metadata={"classes": json.dumps(classes, ensure_ascii=False)})
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(tasks)} heads, projection {tuple(heads['visual_projection.weight'].shape)}, "
          f"logit_scale {heads['logit_scale'].item():.4f} (exp {heads['logit_scale'].exp().item():.2f})")


if __name__ == "__main__":
    main()
