#!/usr/bin/env python3
"""Peak memory and time of `wemoe-engine embed` over a Hugging Face `datasets` parquet split of photographs,
and over the same images as an ImageFolder: how much of a parquet dataset the engine holds.

    .venv/bin/python tools/bench_parquet_memory.py [--images 2000] [--engine path/to/wemoe-engine ...]

Makes (once, in tools/out/parquet_memory/) --images JPEGs of 500 × 375 (crops of scikit-learn's two sample
photographs, each tinted differently; quality 90), written by `datasets` as a split in two shards, and as an
ImageFolder. Runs each engine binary given (default target/release/wemoe-engine) on both with the tiny
tests/fixtures/clip_a (so that the model's own memory is negligible), one run at a time, and prints each run's
peak resident memory (the waited child's ru_maxrss) and wall time.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tools", "out", "parquet_memory")


def make_data(n):
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    split = os.path.join(OUT, f"n{n}")
    if os.path.isdir(split):
        return split
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    rows = {"image": [], "label": []}
    for i in range(n):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 375), rng.integers(0, photo.shape[1] - 500)
        crop = photo[y:y + 375, x:x + 500].astype(np.float32) * rng.uniform(0.8, 1.2, size=3)
        path = os.path.join(split, "folder", f"class_{i % 2}", f"{i:05d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(path, quality=90)
        rows["image"].append({"bytes": open(path, "rb").read(), "path": None})
        rows["label"].append(i % 2)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["class_0", "class_1"])})
    ds = datasets.Dataset.from_dict(rows, features=features)
    os.makedirs(os.path.join(split, "data"))
    ds.select(range(n // 2)).to_parquet(os.path.join(split, "data", "test-00000-of-00002.parquet"))
    ds.select(range(n // 2, n)).to_parquet(os.path.join(split, "data", "test-00001-of-00002.parquet"))
    return split


def run(engine, images):
    """(peak resident MiB, seconds) of one embed run."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [engine, "--device", "cpu", "--quiet", "embed", "--model", os.path.join(ROOT, "tests/fixtures/clip_a"),
               "--images", images, "--out", os.path.join(tmp, "e.safetensors")]
        start = time.perf_counter()
        _, status, usage = os.wait4(subprocess.Popen(cmd).pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            sys.exit(f"{' '.join(cmd)} failed ({status})")
        return usage.ru_maxrss / 1024, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--engine", action="append")
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_only:
        make_data(args.images)
        return
    # The data is made in a child: a child's ru_maxrss counts what it inherited at the fork, so this process
    # stays small (no datasets, no images) for the measured runs.
    subprocess.run([sys.executable, __file__, "--images", str(args.images), "--make-only"], check=True)
    engines = args.engine or [os.path.join(ROOT, "target", "release", "wemoe-engine")]
    split = os.path.join(OUT, f"n{args.images}")
    data = os.path.join(split, "data")
    size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
    print(f"{args.images} JPEGs of 500x375; the parquet split {size / 2**20:.1f} MiB in two shards")
    print(f"{'engine':<28} {'data':<12} {'peak MiB':>9} {'seconds':>8}")
    for engine in engines:
        for name, images in [("parquet", os.path.join(data, "test")), ("imagefolder", os.path.join(split, "folder"))]:
            peak, seconds = run(engine, images)
            print(f"{engine[-28:]:<28} {name:<12} {peak:>9.1f} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
