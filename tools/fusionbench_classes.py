#!/usr/bin/env python3
"""Writes a FusionBench task's class names and prompt templates as JSON, for `wemoe-engine heads`:

    .venv/bin/python tools/fusionbench_classes.py sun397 > sun397.json
    wemoe-engine heads --clip openai/clip-vit-base-patch32 --task sun397=sun397.json --out heads.safetensors

Output: {"task": NAME, "classes": [...], "templates": [...]}, the classes in label order and each template
with {} where FusionBench puts the class name, taken from `fusion_bench.tasks.clip_classification` as its CLIP
task pools take them (`get_classnames_and_templates`). FusionBench's templates are Python functions; each is
called with a marker and checked, on every class name, to be that text with the marker replaced, so a template
that does more than put the name in place is refused rather than written wrong. With several tasks, writes
one file each into --out-dir.

Needs FusionBench (tools/setup-venv.sh installs it); no torch computation.
"""
import argparse
import json
import os
import sys

MARKER = "\x00class\x00"


def fail(message):
    print(f"fusionbench_classes.py: {message}", file=sys.stderr)
    sys.exit(1)


def task_json(task):
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory, get_classnames_and_templates

    available = CLIPTemplateFactory.get_available_datasets()
    if task not in available:
        fail(f"'{task}' is not a FusionBench task ({', '.join(available)})")
    classes, functions = get_classnames_and_templates(task)
    templates = []
    for f in functions:
        text = f(MARKER)
        if MARKER not in text or "{}" in text:
            fail(f"{task}: a template gives {text!r} for the class name, not a text with the name in place")
        for c in classes:
            if f(c) != text.replace(MARKER, c):
                fail(f"{task}: a template does more than put the class name {c!r} in place: {f(c)!r}")
        templates.append(text.replace(MARKER, "{}"))
    return {"task": task, "classes": list(classes), "templates": templates}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="+", help="FusionBench task names (sun397, stanford-cars, mnist, ...)")
    parser.add_argument("--out-dir", help="write TASK.json files here (needed for several tasks)")
    args = parser.parse_args()
    if len(args.task) > 1 and not args.out_dir:
        fail("several tasks need --out-dir")
    for task in args.task:
        text = json.dumps(task_json(task), ensure_ascii=False, indent=1) + "\n"
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            path = os.path.join(args.out_dir, f"{task.replace('/', '_')}.json")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}", file=sys.stderr)
        else:
            sys.stdout.write(text)


if __name__ == "__main__":
    main()
