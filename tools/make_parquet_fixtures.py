#!/usr/bin/env python3
"""Makes tests/fixtures/parquet/: a labelled image dataset in Hugging Face `datasets`' parquet form (how
FusionBench's tasks are stored on the hub), written by `datasets` itself, and what transformers'
CLIPImageProcessorPil makes of each row's image.

Run once (tools/setup-venv.sh first, then pip install datasets): .venv/bin/python tools/make_parquet_fixtures.py
Deterministic; the tests never need Python. The images are the fixture photographs (tests/fixtures/photos) and
a few of tests/fixtures/image_modes (an RGBA PNG, a lossy WebP, a CMYK JPEG), so the rows hold several
formats, as a scraped dataset's do.

- two_shards/: the dataset split over two parquet files (snappy, datasets' default), an `Image` feature
  and a `ClassLabel` with names, so the engine reads the schema metadata and the shards in order;
- by_name.parquet: the same rows in one file as pyarrow writes it (snappy), columns named img and label with
  no `huggingface` metadata (the columns found by name), in row groups of two rows (the reader's jumps
  between row groups);
- two_labels.parquet: three rows in CIFAR-100's layout, an `img` Image feature and two ClassLabels, fine_label
  (cat, dog, fish, bird) before coarse_label (pet, wild), neither named label;
- withheld_labels.parquet, some_labels.parquet: the same three images with `datasets`' mark of a missing label
  (-1) in every row, or labels 1, -1 and null;
- no_image.parquet: a label column and a text column, no image (a bad input);
- path_only.parquet, null_image.parquet: three good rows, then one whose image is a path, or null (bad input
  found when the file opens, in its second row group);
- expected_32.safetensors: each row's pixel values at 32 (`row.{i}`) and the labels.
"""
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers.models.clip import CLIPImageProcessorPil

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "parquet")
SIDE = 32


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(os.path.join(ROOT, "two_shards"))
    files = ["photos/class_0/china_301x217.jpg", "photos/class_0/flower_121x143.png",
             "photos/class_1/china_61x47.jpg", "photos/class_1/flower_grey_97x65.png",
             "image_modes/folder/c/rgba_61x53.png", "image_modes/formats/c/lossy_67x58.webp",
             "image_modes/folder/c/cmyk_63x51.jpg"]
    labels = [2, 0, 1, 1, 2, 0, 1]
    names = ["cat", "dog", "fish"]
    rows = {"image": [{"bytes": open(os.path.join(FIXTURES, f), "rb").read(), "path": None} for f in files],
            "label": labels}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.select(range(4)).to_parquet(os.path.join(ROOT, "two_shards", "test-00000-of-00002.parquet"))
    ds.select(range(4, len(files))).to_parquet(os.path.join(ROOT, "two_shards", "test-00001-of-00002.parquet"))
    # The same rows under other column names, snappy, without the datasets metadata, two rows a row group.
    table = ds.data.table.rename_columns(["img", "label"]).replace_schema_metadata(None)
    pq.write_table(table, os.path.join(ROOT, "by_name.parquet"), row_group_size=2)
    # CIFAR-100's layout (uoft-cs/cifar100): an `img` Image, then two ClassLabels, `fine_label` before
    # `coarse_label`, neither named label. The first in column order is the task's labels.
    two = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names + ["bird"]),
                             "coarse_label": datasets.ClassLabel(names=["pet", "wild"])})
    two_rows = {"img": [rows["image"][i] for i in (2, 3, 5)], "fine_label": [3, 0, 2], "coarse_label": [1, 0, 1]}
    datasets.Dataset.from_dict(two_rows, features=two).to_parquet(os.path.join(ROOT, "two_labels.parquet"))
    # A test split whose labels are withheld, as `datasets` marks a ClassLabel's missing value (-1), and one with
    # a label in some rows only (-1 and null in others).
    for name, ids in [("withheld_labels.parquet", [-1, -1, -1]), ("some_labels.parquet", [1, -1, None])]:
        some = {"image": [rows["image"][i] for i in (2, 3, 5)], "label": ids}
        datasets.Dataset.from_dict(some, features=features).to_parquet(os.path.join(ROOT, name))

    pq.write_table(pa.table({"label": [0, 1], "text": ["a", "b"]}), os.path.join(ROOT, "no_image.parquet"))
    # Rows the engine must refuse when the file opens, after good ones (in a later row group): an image stored
    # as a path (as `datasets` keeps local files), and a null image.
    small = open(os.path.join(FIXTURES, "photos/class_1/china_61x47.jpg"), "rb").read()
    image_type = ds.data.table.schema.field("image").type
    for name, bad in [("path_only.parquet", {"bytes": None, "path": "images/0003.jpg"}), ("null_image.parquet", None)]:
        cells = [{"bytes": small, "path": None}] * 3 + [bad]
        table = pa.table({"image": pa.array(cells, type=image_type), "label": pa.array([0, 1, 2, 0], pa.int64())})
        pq.write_table(table.replace_schema_metadata(ds.data.table.schema.metadata), os.path.join(ROOT, name),
                       row_group_size=2)

    proc = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    expected = {"labels": torch.tensor(labels)}
    reloaded = datasets.Dataset.from_parquet(os.path.join(ROOT, "two_shards", "*.parquet"))
    for i, row in enumerate(reloaded):
        # As FusionBench's CLIPDataset hands it over: the decoded PIL image, unconverted.
        expected[f"row.{i}"] = proc(images=row["image"], return_tensors="pt")["pixel_values"][0].contiguous()
    save_file(expected, os.path.join(ROOT, "expected_32.safetensors"))
    for d, _, ns in os.walk(ROOT):
        for n in sorted(ns):
            print(os.path.relpath(os.path.join(d, n), ROOT), os.path.getsize(os.path.join(d, n)))


if __name__ == "__main__":
    main()
