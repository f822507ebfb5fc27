#!/usr/bin/env python3
"""Makes tests/fixtures/clip_tokenizer/: what Hugging Face's CLIPTokenizer gives for prompts that test every
step of its encoding (NFC, whitespace, lowercasing, the piece pattern's letters, digits, contractions and
punctuation, byte-level symbols, merges by rank), with CLIP's own merges, so that the engine's tokenizer is
checked against the real vocabulary without committing all of it.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_tokenizer_fixtures.py [--bpe FILE]
Deterministic; the tests never need Python.

CLIP's merges are OpenAI's `bpe_simple_vocab_16e6.txt.gz`, as the `open_clip_torch` wheel on PyPI carries it
(downloaded with pip when --bpe is not given). Its vocabulary and merges are built as OpenAI's tokenizer and
the Hub's `openai/clip-vit-*` `vocab.json`/`merges.txt` have them: the 256 byte symbols, the same with `</w>`,
one token per merge in rank order, then `<|startoftext|>` and `<|endoftext|>` (49408 tokens). The script
checks a few ids every CLIP user knows (`a photo of a cat.`).

The fixture keeps only the merges the prompts use (in rank order, ids unchanged) and the tokens they make,
with every byte symbol: byte-pair encoding applies, at each step, the lowest-ranked merge among the word's
adjacent pairs, and a merge that applied with all of them still is the lowest among a subset holding it, so
the subset encodes these prompts exactly as the whole. The script checks that too, with transformers on both.

- vocab.json, merges.txt, tokenizer_config.json: the subset, loadable by transformers;
- tokenizer_json/tokenizer.json: the same tokenizer as the `tokenizers` library saves it (one file, its merges
  as pairs), the form some CLIP checkpoints carry without vocab.json and merges.txt;
- expected.json: `[{"text": ..., "ids": [...]}]`, transformers' ids with the whole vocabulary.
"""
import argparse
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

from transformers import CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "clip_tokenizer")

# Prompts as FusionBench fills its templates, and text that exercises each rule of the encoding.
PROMPTS = [
    "a photo of a cat.",
    "a photo of a Bernese mountain dog.",
    "a centered satellite photo of annual crop land.",
    'a photo of the number: "7".',
    "a photo of a 2012 Ford F-150 Regular Cab.",
    "a photo of a jack-o'-lantern, a type of object.",
    "i'm sure it's what they've said we'll do, you're right, he'd know",
    "IT'S LOUD AND 'TIS OLD",
    "  leading,   inner\t\ttabs\nand newlines  ",
    "café crème brûlée",
    "cafe\u0301 (e and a combining acute: NFC makes it é)",
    "CAFÉ ÉCLAIR ÀÖØ",
    "ΣΊΣΥΦΟΣ and ὈΔΥΣΣΕΎΣ",
    "İstanbul and ǅemal",
    "x² + ½ and Ⅻ o'clock, ٣ apples",
    "日本語の写真、東京タワー",
    "a photo of a 🐶 and a 🐈‍⬛!!",
    "ﬁne ﬂour, ﬀ",
    "...--==>>??<<!!",
    "snake_case and kebab-case and dotted.name.here",
    "a",
    "",
    "the the the the aaaaaaaaaaaaaaaaaaaaaa",
]

# Ids every CLIP user has seen: `<|startoftext|>a photo of a cat.<|endoftext|>`.
KNOWN = ("a photo of a cat.", [49406, 320, 1125, 539, 320, 2368, 269, 49407])


def bytes_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters, as CLIP's tokenizer uses it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def find_bpe():
    wheels = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, "open_clip_torch"],
                   check=True)
    [wheel] = glob.glob(os.path.join(wheels, "open_clip_torch-*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        return z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"), os.path.basename(wheel)


def write_tokenizer(path, vocab, merges):
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)


def merges_used(tokenizer, ranks, text):
    """The merges byte-pair encoding applies to `text`'s pieces, by the tokenizer's own pre-tokenisation."""
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text)
    used = set()
    for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            pairs = [p for p in pairs if p[0] is not None]
            if not pairs:
                break
            _, i = min(pairs)
            used.add((word[i], word[i + 1]))
            word[i:i + 2] = [word[i] + word[i + 1]]
    return used


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (default: from the open_clip_torch wheel)")
    args = parser.parse_args()
    if args.bpe:
        with open(args.bpe, "rb") as f:
            data, source = f.read(), os.path.basename(args.bpe)
    else:
        data, source = find_bpe()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)

    with tempfile.TemporaryDirectory() as whole_dir:
        write_tokenizer(whole_dir, vocab, merges)
        whole = CLIPTokenizer.from_pretrained(whole_dir)
        ids = {text: whole(text)["input_ids"] for text in PROMPTS}
        assert ids[KNOWN[0]] == KNOWN[1], ids[KNOWN[0]]
        ranks = {m: r for r, m in enumerate(merges)}
        used = set().union(*(merges_used(whole, ranks, t) for t in PROMPTS))
    kept = [m for m in merges if m in used]
    kept_tokens = set(symbols) | {s + "</w>" for s in symbols} | {"".join(m) for m in kept}
    kept_tokens |= {"<|startoftext|>", "<|endoftext|>"}
    subset = {t: i for t, i in vocab.items() if t in kept_tokens}

    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    write_tokenizer(ROOT, subset, kept)
    part = CLIPTokenizer.from_pretrained(ROOT)
    for text in PROMPTS:
        assert part(text)["input_ids"] == ids[text], text
    os.makedirs(os.path.join(ROOT, "tokenizer_json"))
    part.backend_tokenizer.save(os.path.join(ROOT, "tokenizer_json", "tokenizer.json"))
    with open(os.path.join(ROOT, "expected.json"), "w", encoding="utf-8") as f:
        rows = ",\n".join(json.dumps({"text": t, "ids": ids[t]}, ensure_ascii=False) for t in PROMPTS)
        f.write(f'{{"merges_from": {json.dumps(source)},\n"prompts": [\n{rows}\n]}}\n')
    print(f"{len(PROMPTS)} prompts, {len(kept)} of {len(merges)} merges, {len(subset)} tokens, from {source}")


if __name__ == "__main__":
    main()
