#!/usr/bin/env python3
"""Makes tests/fixtures/processor_configs/: preprocessor_config.json files in the other shapes
CLIPImageProcessor accepts, and what transformers' CLIPImageProcessorPil makes of the photos of
tests/fixtures/photos under each.

Run once (tools/setup-venv.sh first, and tools/make_fixtures.py for the photos):
    .venv/bin/python tools/make_processor_fixtures.py
Deterministic; the tests never need Python.

- exact_square/: `size` {"height", "width"} (a resize to exactly that size, the aspect ratio not kept) and no
  centre crop, as some checkpoints are saved.
- exact_then_crop/: `size` {"height": 40, "width": 36}, then a 32 × 32 centre crop.
- integer_sizes/: `size` and `crop_size` as bare integers (older checkpoints): a shortest edge and a square crop.
Each folder holds its preprocessor_config.json (written by the processor itself) and expected.safetensors, one
[3, 32, 32] tensor per photo, named by its path under photos/.
"""
import json
import os
import shutil

from PIL import Image
from safetensors.torch import save_file
from transformers.models.clip import CLIPImageProcessorPil

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "processor_configs")
PHOTOS = os.path.join(FIXTURES, "photos")

CONFIGS = {
    "exact_square": dict(size={"height": 32, "width": 32}, do_center_crop=False),
    "exact_then_crop": dict(size={"height": 40, "width": 36}, crop_size={"height": 32, "width": 32}),
}


def photo_names():
    names = []
    for cls in sorted(os.listdir(PHOTOS)):
        names += [f"{cls}/{f}" for f in sorted(os.listdir(os.path.join(PHOTOS, cls)))]
    return names


def write(name, proc, config=None):
    out = os.path.join(ROOT, name)
    os.makedirs(out)
    if config is None:
        proc.to_json_file(os.path.join(out, "preprocessor_config.json"))
    else:
        with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    expected = {}
    for n in photo_names():
        img = Image.open(os.path.join(PHOTOS, n)).convert("RGB")
        pixels = proc(images=img, return_tensors="pt")["pixel_values"][0].contiguous()
        assert tuple(pixels.shape) == (3, 32, 32), (name, n, pixels.shape)
        expected[n] = pixels
    save_file(expected, os.path.join(out, "expected.safetensors"))


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    for name, kwargs in CONFIGS.items():
        write(name, CLIPImageProcessorPil(**kwargs))
    # Bare integers, as older processors saved them; transformers reads `size` as the shortest edge and
    # `crop_size` as a square.
    config = {"image_processor_type": "CLIPImageProcessor", "size": 40, "crop_size": 32, "do_center_crop": True,
              "do_resize": True, "resample": 3}
    write("integer_sizes", CLIPImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"}),
          config)


if __name__ == "__main__":
    main()
