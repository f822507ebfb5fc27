#!/usr/bin/env python3
"""Makes tests/fixtures/pickle/: model folders holding PyTorch's `torch.save` files, as transformers 4 saved
checkpoints before safetensors (`pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json`),
written by torch.save itself, and pickles the engine must refuse.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_pickle_fixtures.py. The tests never need Python.

- clip_c/: tests/fixtures/clip_c's config and its state dict (bf16 storages) in one pytorch_model.bin;
- clip_b_sharded/: tests/fixtures/clip_b's tensors as `nn.Parameter`s in two shards with transformers 4's
  names and index: the first shard's parameters carry an attribute, as transformers sets on its models'
  (`_rebuild_parameter_with_state`), the second's none (`_rebuild_parameter`);
- refused/calls_print.bin: a state dict with one entry whose pickle calls `builtins.print` (any code a pickle
  names would run in Python; this one is harmless);
- refused/strided.bin: a transposed view (strides (1, 4)) saved as it is;
- refused/legacy.bin: the format before PyTorch 1.6 (a bare pickle, not a zip archive; its storage keys
  follow object ids, so its bytes differ from run to run);
- refused/big_endian.bin: clip_c's archive with its `byteorder` entry saying `big`, as torch.save writes it on
  a big-endian machine (none is at hand: the entries are copied, that one rewritten).
"""
import json
import os
import shutil
import zipfile

import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "pickle")


class CallsPrint:
    def __reduce__(self):
        return (print, ("a pickle that runs code when Python loads it",))


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    for d in ("clip_c", "clip_b_sharded", "refused"):
        os.makedirs(os.path.join(ROOT, d))

    clip_c = CLIPVisionModel.from_pretrained(os.path.join(FIXTURES, "clip_c"), dtype=torch.bfloat16)
    shutil.copy(os.path.join(FIXTURES, "clip_c", "config.json"), os.path.join(ROOT, "clip_c"))
    torch.save(clip_c.state_dict(), os.path.join(ROOT, "clip_c", "pytorch_model.bin"))

    shutil.copy(os.path.join(FIXTURES, "clip_b", "config.json"), os.path.join(ROOT, "clip_b_sharded"))
    params = {n: torch.nn.Parameter(t) for n, t in load_file(os.path.join(FIXTURES, "clip_b", "model.safetensors")).items()}
    names = sorted(params)
    half = len(names) // 2
    for n in names[:half]:
        params[n]._is_hf_initialized = True
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: params[n] for n in part}, os.path.join(ROOT, "clip_b_sharded", file))
        weight_map.update({n: file for n in part})
    total = sum(p.numel() * p.element_size() for p in params.values())
    with open(os.path.join(ROOT, "clip_b_sharded", "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)

    refused = os.path.join(ROOT, "refused")
    torch.save({"w": torch.zeros(2), "x": CallsPrint()}, os.path.join(refused, "calls_print.bin"))
    torch.save({"w": torch.arange(12.0).reshape(3, 4).t()}, os.path.join(refused, "strided.bin"))
    torch.save({"w": torch.zeros(2)}, os.path.join(refused, "legacy.bin"), _use_new_zipfile_serialization=False)
    source = zipfile.ZipFile(os.path.join(ROOT, "clip_c", "pytorch_model.bin"))
    with zipfile.ZipFile(os.path.join(refused, "big_endian.bin"), "w", zipfile.ZIP_STORED) as out:
        for entry in source.infolist():
            data = b"big" if entry.filename.endswith("/byteorder") else source.read(entry)
            out.writestr(entry.filename, data)
    print(f"torch {torch.__version__}: {ROOT}")


if __name__ == "__main__":
    main()
