#!/usr/bin/env python3
"""Makes the golden fixtures of tests/fixtures/ with the real reference, HF transformers.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_fixtures.py
Deterministic from the seeds below; the tests never need Python.

Models (random weights, every dimension different, non-trivial LayerNorms):
  clip_a  CLIPModel (vision + tiny text), f32, sharded with model.safetensors.index.json, keys prefixed,
          image 32 / patch 8 (17 tokens), width 48, 4 heads, MLP 80 (ratio 5/3), 2 layers, quick_gelu,
          eps 1e-5, projection 24, logit_scale, and a preprocessor_config.json (shortest edge 32).
  clip_b  CLIPVisionModelWithProjection, f32, one file, keys prefixed, image 30 / patch 6 (26 tokens),
          width 36, 3 heads, MLP 100, 2 layers, gelu, eps 1e-6, projection 20, no logit_scale.
  clip_c  CLIPVisionModel in bf16 (no projection), image 28 / patch 7, width 40, 5 heads, MLP 56,
          1 layer, quick_gelu; transformers >= 5 saves it WITHOUT the vision_model. prefix; its heads
          file carries the projection and logit_scale.
Expected outputs come from transformers in float32 (clip_c: its bf16 weights loaded as float32).
Photos: crops of the two photographs scikit-learn ships (sklearn/datasets/images, CC BY 2.0 / public
domain per its README.txt), preprocessed by CLIPImageProcessorPil (Pillow's antialiased bicubic).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          CLIPVisionModelWithProjection)
from transformers.models.clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def randomize(model, seed):
    """Every parameter random and O(1) in effect, LayerNorms far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("logit_scale"):
                p.fill_(np.log(100.0))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def heads(seed, tasks, width):
    g = torch.Generator().manual_seed(seed)
    return {f"head.{t}": F.normalize(torch.randn(c, width, generator=g), dim=-1) for t, c in tasks.items()}


def reference(vision, projection, scale_raw, pixels, head_tensors):
    """pooler_output, image_embeds and logits per head, as transformers computes them."""
    with torch.no_grad():
        pooled = vision(pixel_values=pixels).pooler_output
        out = {"pooler_output": pooled}
        if projection is not None:
            embeds = pooled @ projection.T
            out["image_embeds"] = embeds
            normed = F.normalize(embeds, dim=-1)
            for k, h in head_tensors.items():
                out["logits." + k[len("head."):]] = scale_raw.exp() * normed @ h.T
    return {k: v.contiguous() for k, v in out.items()}


def photos():
    """Real photographs cropped to odd sizes: a JPEG, a PNG, a small JPEG that must be upsampled."""
    import sklearn.datasets
    src = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    china = Image.open(os.path.join(src, "china.jpg")).convert("RGB")
    flower = Image.open(os.path.join(src, "flower.jpg")).convert("RGB")
    out = os.path.join(ROOT, "photos")
    # Two class folders, so the same files serve as an ImageFolder tree.
    files = {
        "class_0/china_301x217.jpg": china.crop((101, 57, 101 + 301, 57 + 217)),
        "class_0/flower_121x143.png": flower.crop((200, 90, 200 + 121, 90 + 143)),
        "class_1/china_61x47.jpg": china.crop((390, 200, 390 + 61, 200 + 47)),
        "class_1/flower_grey_97x65.png": flower.crop((10, 10, 10 + 97, 10 + 65)).convert("L"),
    }
    for n, img in files.items():
        os.makedirs(os.path.dirname(os.path.join(out, n)), exist_ok=True)
        img.save(os.path.join(out, n), quality=90)
    names = sorted(files)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    expected = {}
    for n in names:
        img = Image.open(os.path.join(out, n))
        expected[n] = proc(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0].contiguous()
    save_file(expected, os.path.join(ROOT, "photos_expected_48.safetensors"))
    return names


def main():
    torch.manual_seed(0)
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    photo_names = photos()

    # clip_a: full CLIPModel, sharded, prefixed.
    vision_a = dict(image_size=32, patch_size=8, hidden_size=48, num_attention_heads=4, intermediate_size=80,
                    num_hidden_layers=2, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text_a = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16)
    model_a = randomize(CLIPModel(CLIPConfig(vision_config=vision_a, text_config=text_a, projection_dim=24)), 1)
    dir_a = os.path.join(ROOT, "clip_a")
    model_a.save_pretrained(dir_a, max_shard_size="60KB")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dir_a)
    assert os.path.exists(os.path.join(dir_a, "model.safetensors.index.json")), "clip_a must be sharded"

    # clip_b: vision tower with projection, unprefixed keys, gelu.
    cfg_b = CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=36, num_attention_heads=3, intermediate_size=100,
                             num_hidden_layers=2, hidden_act="gelu", layer_norm_eps=1e-6, projection_dim=20)
    model_b = randomize(CLIPVisionModelWithProjection(cfg_b), 2)
    dir_b = os.path.join(ROOT, "clip_b")
    model_b.save_pretrained(dir_b)

    # clip_c: bf16 vision-only model.
    cfg_c = CLIPVisionConfig(image_size=28, patch_size=7, hidden_size=40, num_attention_heads=5, intermediate_size=56,
                             num_hidden_layers=1, hidden_act="quick_gelu", projection_dim=16)
    model_c = randomize(CLIPVisionModel(cfg_c), 3).to(torch.bfloat16)
    dir_c = os.path.join(ROOT, "clip_c")
    model_c.save_pretrained(dir_c)
    model_c = CLIPVisionModel.from_pretrained(dir_c, dtype=torch.float32).eval()
    with open(os.path.join(dir_c, "model.safetensors"), "rb") as f:
        header = f.read(4096)
    assert b'"embeddings.class_embedding"' in header, "clip_c is expected without the vision_model. prefix"

    g = torch.Generator().manual_seed(4)
    cases = {
        "a": (model_a.vision_model, model_a.visual_projection.weight.detach(), model_a.logit_scale.detach(), 32,
              {"alpha": 7, "beta": 3}, 24, None),
        "b": (model_b.vision_model, model_b.visual_projection.weight.detach(), torch.tensor(np.log(100.0)), 30,
              {"gamma": 5}, 20, None),
        "c": (model_c, None, None, 28, {"delta": 4}, 16, 40),
    }
    for key, (vision, proj, scale, size, tasks, p, d) in cases.items():
        pixels = torch.randn(3, 3, size, size, generator=g)
        labels = torch.randint(0, min(tasks.values()), (3,), generator=g)
        save_file({"pixel_values": pixels.contiguous(), "labels": labels}, os.path.join(ROOT, f"pixels_{key}.safetensors"))
        hs = heads(10 + ord(key), tasks, p)
        if key == "a":
            # The heads file's logit_scale wins over the model's.
            hs["logit_scale"] = torch.tensor(3.0)
            scale = hs["logit_scale"]
        if key == "c":
            proj = torch.randn(p, d, generator=g) / np.sqrt(d)
            hs["visual_projection.weight"] = proj
            hs["logit_scale"] = torch.tensor(np.log(80.0), dtype=torch.float32)
            scale = hs["logit_scale"]
        save_file(hs, os.path.join(ROOT, f"heads_{key}.safetensors"))
        out = reference(vision, proj, scale, pixels, {k: v for k, v in hs.items() if k.startswith("head.")})
        if key == "c":
            # The model itself has no projection: embed writes only the pooled output.
            out = {k: v for k, v in out.items() if not k.startswith("image_embeds")}
        save_file(out, os.path.join(ROOT, f"expected_{key}.safetensors"))

    # Raw 8-bit images (the `images` layout) and an ImageFolder tree, through clip_a's preprocessing.
    china = np.asarray(Image.open(os.path.join(ROOT, "photos", "class_0", "china_301x217.jpg")).convert("RGB"))
    crops = np.stack([china[y:y + 50, x:x + 70] for y, x in [(0, 0), (20, 90), (150, 200), (100, 31)]])
    save_file({"images": torch.from_numpy(crops.copy()), "labels": torch.tensor([0, 1, 2, 1])},
              os.path.join(ROOT, "images_u8.safetensors"))
    proc_a = CLIPImageProcessorPil.from_pretrained(dir_a)
    pix_u8 = proc_a(images=[Image.fromarray(c) for c in crops], return_tensors="pt")["pixel_values"]
    folder_imgs = [Image.open(os.path.join(ROOT, "photos", n)).convert("RGB") for n in photo_names]
    pix_folder = proc_a(images=folder_imgs, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = load_file(os.path.join(ROOT, "heads_a.safetensors"))
        res = {}
        for tag, pix in (("u8", pix_u8), ("folder", pix_folder)):
            pooled = model_a.vision_model(pixel_values=pix).pooler_output
            logits = hs["logit_scale"].exp() * F.normalize(model_a.visual_projection(pooled), dim=-1) @ hs["head.beta"].T
            res[f"pixel_values.{tag}"] = pix.contiguous()
            res[f"pooler_output.{tag}"] = pooled.contiguous()
            res[f"logits_beta.{tag}"] = logits.contiguous()
    save_file(res, os.path.join(ROOT, "expected_a_images.safetensors"))

    # What `info` must report, counted by torch.
    def vision_counts(model, prefix):
        params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        return {"vision_parameters": sum(p.numel() for p in params), "vision_tensors": len(params)}
    info = {"clip_a": vision_counts(model_a, "vision_model."), "clip_b": vision_counts(model_b, "vision_model."),
            "clip_c": vision_counts(model_c, "")}
    with open(os.path.join(ROOT, "expected_info.json"), "w") as f:
        json.dump(info, f, indent=1)

    # A small record of what made these files.
    import transformers
    with open(os.path.join(ROOT, "PROVENANCE.json"), "w") as f:
        json.dump({"script": "tools/make_fixtures.py", "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": sys.version.split()[0],
                   "photos": "crops of scikit-learn's sample images china.jpg and flower.jpg"}, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ROOT) for n in ns)
    print(f"fixtures in {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
