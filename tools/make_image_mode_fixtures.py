#!/usr/bin/env python3
"""Makes tests/fixtures/image_modes/: image files in the pixel formats that need more than decoding to become
RGB (transparency, 16-bit samples, CMYK), files in every other format the engine reads, and what
transformers' CLIPImageProcessorPil makes of them.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_image_mode_fixtures.py
Deterministic; the tests never need Python. The images are crops of scikit-learn's flower.jpg (as in
make_fixtures.py) with made-up alpha channels, palettes, 16-bit samples and inks.

- folder/c/*.png, *.jpg: one class folder, each file given to the processor as FusionBench gives a dataset's
  image: `Image.open(path)` unconverted, so transformers' convert_to_rgb composites any transparency (an
  alpha channel, or a tRNS chunk on a palette, grey or RGB image) onto white. 16-bit samples are read by
  Pillow as their high byte, except 16-bit grey, which Pillow keeps as mode I;16 and transformers then
  clips to 255 (a white image): the engine takes the high byte there too, so that file's expected pixels
  come from the high-byte 8-bit image. A CMYK JPEG: Pillow inverts its samples (Adobe's convention) and
  converts them to RGB.
- formats/c/*: WebP (lossy, lossless, with alpha), BMP, GIF, TIFF and PNM files, unconverted as above.
- composite/c/pairs.png and composite_expected.png: every (value, alpha) pair of 8-bit samples, and
  transformers' convert_to_rgb of it at full size (no resize), so the compositing itself is checked
  exactly.
- rgba_u8.safetensors: the same kind of RGBA crops as an `images` array [N, H, W, 4], with the pixel
  values the processor gives for `Image.fromarray` of each.
"""
import os
import shutil
import struct
import zlib

import numpy as np
import sklearn.datasets
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "image_modes")
SIDE = 32


def png16(path, samples, colour_type):
    """A 16-bit PNG (Pillow writes 16-bit PNGs only for grey), big-endian samples, no filtering."""
    h, w = samples.shape[:2]
    rows = samples.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    folder = os.path.join(ROOT, "folder", "c")
    os.makedirs(folder)
    src = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "flower.jpg")
    flower = Image.open(src).convert("RGB")
    rng = np.random.default_rng(7)

    def crop(x, y, w, h):
        return flower.crop((x, y, x + w, y + h))

    def alpha(h, w):
        # Opaque, transparent and everything between, in patches: transparent regions must turn white.
        a = rng.integers(0, 256, (h, w)).astype(np.uint8)
        a[: h // 3] = 255
        a[h // 3: h // 2, : w // 2] = 0
        return a

    rgb = np.asarray(crop(200, 90, 61, 53))
    Image.fromarray(np.dstack([rgb, alpha(53, 61)]), "RGBA").save(os.path.join(folder, "rgba_61x53.png"))
    grey = np.asarray(crop(30, 40, 47, 70).convert("L"))
    Image.fromarray(np.dstack([grey, alpha(70, 47)]), "LA").save(os.path.join(folder, "grey_alpha_47x70.png"))
    palette = crop(120, 150, 57, 49).quantize(colors=23)
    palette.save(os.path.join(folder, "palette_alpha_57x49.png"),
                 transparency=bytes(rng.integers(0, 256, 23).astype(np.uint8)))
    keyed = crop(300, 20, 52, 60).quantize(colors=6).convert("RGB")
    key = tuple(int(v) for v in np.asarray(keyed)[30, 26])
    keyed.save(os.path.join(folder, "rgb_key_52x60.png"), transparency=key)
    grey_keyed = crop(90, 300, 44, 41).convert("L").quantize(colors=5).convert("L")
    grey_keyed.save(os.path.join(folder, "grey_key_44x41.png"), transparency=int(np.asarray(grey_keyed)[20, 22]))
    rgb16 = np.asarray(crop(150, 200, 59, 45)).astype(np.uint16) * 257 + rng.integers(0, 257, (45, 59, 3))
    png16(os.path.join(folder, "rgb16_59x45.png"), rgb16, 2)
    rgba16 = np.dstack([np.asarray(crop(250, 260, 43, 50)).astype(np.uint16) * 257,
                        alpha(50, 43).astype(np.uint16) * 257 + rng.integers(0, 257, (50, 43))])
    png16(os.path.join(folder, "rgba16_43x50.png"), rgba16, 6)
    grey16 = np.asarray(crop(400, 100, 55, 46).convert("L")).astype(np.uint16) * 257 + rng.integers(0, 257, (46, 55))
    png16(os.path.join(folder, "grey16_55x46.png"), grey16.astype(np.uint16), 0)

    # CMYK JPEG (Pillow writes the samples inverted, with an Adobe marker, as Photoshop does), every ink
    # including black varying.
    cmyk = np.dstack([255 - np.asarray(crop(60, 220, 63, 51)), rng.integers(0, 256, (51, 63)).astype(np.uint8)])
    Image.frombytes("CMYK", (63, 51), np.ascontiguousarray(cmyk).tobytes()).save(
        os.path.join(folder, "cmyk_63x51.jpg"), quality=92)

    proc = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    expected = {}
    for name in sorted(os.listdir(folder)):
        image = Image.open(os.path.join(folder, name))
        if image.mode == "I;16":
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
        expected[name] = proc(images=image, return_tensors="pt")["pixel_values"][0].contiguous()
    save_file(expected, os.path.join(ROOT, "folder_expected_32.safetensors"))

    # The other formats torchvision's ImageFolder reads (and GIF, PBM), unconverted as above: lossy and
    # lossless WebP (with alpha), BMP (24-bit and palette), GIF with a transparent index, TIFF (LZW; RGBA), PNM.
    formats = os.path.join(ROOT, "formats", "c")
    os.makedirs(formats)
    photo = crop(170, 120, 67, 58)
    photo.save(os.path.join(formats, "lossy_67x58.webp"), quality=75)
    Image.fromarray(np.dstack([np.asarray(crop(20, 260, 45, 62)), alpha(62, 45)]), "RGBA").save(
        os.path.join(formats, "lossless_alpha_45x62.webp"), lossless=True)
    Image.fromarray(np.dstack([np.asarray(crop(350, 60, 51, 39)), alpha(39, 51)]), "RGBA").save(
        os.path.join(formats, "lossy_alpha_51x39.webp"), quality=80)
    photo.save(os.path.join(formats, "rgb_67x58.bmp"))
    crop(240, 330, 49, 57).quantize(colors=50).save(os.path.join(formats, "palette_49x57.bmp"))
    gif = crop(410, 230, 58, 47).quantize(colors=30)
    gif.save(os.path.join(formats, "palette_key_58x47.gif"), transparency=int(np.asarray(gif)[23, 29]))
    crop(60, 380, 53, 44).save(os.path.join(formats, "rgb_lzw_53x44.tif"), compression="tiff_lzw")
    Image.fromarray(np.dstack([np.asarray(crop(500, 20, 41, 55)), alpha(55, 41)]), "RGBA").save(
        os.path.join(formats, "rgba_41x55.tif"))
    crop(280, 400, 62, 41).save(os.path.join(formats, "rgb_62x41.ppm"))
    crop(130, 20, 39, 60).convert("L").save(os.path.join(formats, "grey_39x60.pgm"))
    crop(450, 300, 47, 45).convert("1").save(os.path.join(formats, "bits_47x45.pbm"))
    expected = {name: proc(images=Image.open(os.path.join(formats, name)), return_tensors="pt")["pixel_values"][0]
                for name in sorted(os.listdir(formats))}
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(ROOT, "formats_expected_32.safetensors"))

    # Every 8-bit (value, alpha) pair: values across, alpha down (R = G = B), in a class folder of its own.
    pairs = np.zeros((256, 256, 4), np.uint8)
    pairs[..., :3] = np.arange(256, dtype=np.uint8)[None, :, None]
    pairs[..., 3] = np.arange(256, dtype=np.uint8)[:, None]
    os.makedirs(os.path.join(ROOT, "composite", "c"))
    Image.fromarray(pairs, "RGBA").save(os.path.join(ROOT, "composite", "c", "pairs.png"))
    composited = convert_to_rgb(Image.open(os.path.join(ROOT, "composite", "c", "pairs.png")), return_numpy=True)
    Image.fromarray(composited, "RGB").save(os.path.join(ROOT, "composite_expected.png"))

    # RGBA arrays in the `images` layout.
    arrays = np.stack([np.dstack([np.asarray(crop(x, y, 40, 36)), alpha(36, 40)])
                       for x, y in ((10, 10), (220, 180), (330, 330))])
    save_file({"images": torch.from_numpy(arrays), "labels": torch.tensor([0, 1, 0])},
              os.path.join(ROOT, "rgba_u8.safetensors"))
    pix = proc(images=[Image.fromarray(a, "RGBA") for a in arrays], return_tensors="pt")["pixel_values"]
    save_file({"pixel_values": pix.contiguous()}, os.path.join(ROOT, "rgba_u8_expected_32.safetensors"))

    for d in (folder, formats):
        for name in sorted(os.listdir(d)):
            print(f"{name}: Pillow mode {Image.open(os.path.join(d, name)).mode}")
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ROOT) for n in ns)
    print(f"fixtures in {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
