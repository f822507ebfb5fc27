#!/usr/bin/env python3
"""Makes tests/fixtures/hf_cache/: a Hugging Face Hub cache as huggingface_hub writes it, holding a model
and a dataset made of other fixtures, for the engine's Hub names (`wemoe-fixtures/clip-c`,
`wemoe-fixtures/pets:test`; src/hub_cache.rs).

Nothing can be downloaded here, so each file goes in through the functions `hf_hub_download` itself calls
once a file has come: the blob named by its etag (an LFS file's sha256, else its git blob sha1), the
snapshot's relative symlink to it (`_create_symlink`), the revision's ref (`_cache_commit_hash_for_specific_revision`), the cache's CACHEDIR.TAG.
The result is checked with huggingface_hub's own readers, `scan_cache_dir` and `try_to_load_from_cache`.

Run once (tools/setup-venv.sh first): .venv/bin/python tools/make_hf_cache_fixtures.py. Deterministic.

- models--wemoe-fixtures--clip-c: `main` holds tests/fixtures/clip_c, the tag `v0` an earlier commit
  holding tests/fixtures/clip_b;
- datasets--wemoe-fixtures--pets: `main` holds data/test-0000{0,1}-of-00002.parquet (the two shards of
  tests/fixtures/parquet/two_shards) and data/train-00000-of-00001.parquet (parquet/no_image.parquet: only
  its name matters); `refs/convert/parquet` holds the same test shards as the hub's parquet conversion lays
  them out, default/test/0000.parquet and 0001.parquet (the same blobs).
"""
import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub
from huggingface_hub import file_download, scan_cache_dir, try_to_load_from_cache

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CACHE = os.path.join(FIXTURES, "hf_cache")
LFS = (".safetensors", ".parquet")


def etag(name, data):
    """The etag the hub gives a file: the sha256 of an LFS file, the git blob sha1 of any other."""
    if name.endswith(LFS):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit(repo_type, repo_id, revision, files):
    """Puts `files` ({name in the repo: source path}) in the cache as one commit reached by `revision`."""
    contents = {name: open(os.path.join(FIXTURES, src), "rb").read() for name, src in files.items()}
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + contents[name])
    commit_hash = digest.hexdigest()
    storage = os.path.join(CACHE, file_download.repo_folder_name(repo_id=repo_id, repo_type=repo_type))
    for name, data in sorted(contents.items()):
        blob = os.path.join(storage, "blobs", etag(name, data))
        pointer = file_download._get_pointer_path(storage, commit_hash, name)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(data)
        file_download._create_symlink(blob, pointer, new_blob=False)
    file_download._cache_commit_hash_for_specific_revision(storage, revision, commit_hash)
    return commit_hash


def main():
    if os.path.isdir(CACHE):
        shutil.rmtree(CACHE)
    os.makedirs(CACHE)
    file_download._create_cachedir_tag(Path(CACHE))
    model = "wemoe-fixtures/clip-c"
    v0 = commit("model", model, "v0", {"config.json": "clip_b/config.json", "model.safetensors": "clip_b/model.safetensors"})
    main_model = commit(
        "model", model, "main", {"config.json": "clip_c/config.json", "model.safetensors": "clip_c/model.safetensors"}
    )
    shards = ["parquet/two_shards/test-00000-of-00002.parquet", "parquet/two_shards/test-00001-of-00002.parquet"]
    data = "wemoe-fixtures/pets"
    main_data = commit(
        "dataset",
        data,
        "main",
        {
            "data/test-00000-of-00002.parquet": shards[0],
            "data/test-00001-of-00002.parquet": shards[1],
            "data/train-00000-of-00001.parquet": "parquet/no_image.parquet",
        },
    )
    converted = commit(
        "dataset",
        data,
        "refs/convert/parquet",
        {"default/test/0000.parquet": shards[0], "default/test/0001.parquet": shards[1]},
    )

    # huggingface_hub's own readers see the repositories, revisions and files meant.
    info = scan_cache_dir(CACHE)
    assert not info.warnings, info.warnings
    seen = {(r.repo_type, r.repo_id): {rev.commit_hash: sorted(f.file_name for f in rev.files) for rev in r.revisions} for r in info.repos}
    assert set(seen) == {("model", model), ("dataset", data)}, seen
    assert seen[("model", model)] == {v0: ["config.json", "model.safetensors"], main_model: ["config.json", "model.safetensors"]}
    assert sorted(seen[("dataset", data)]) == sorted([main_data, converted])
    for repo_id, repo_type, revision, name, source in [
        (model, "model", None, "model.safetensors", "clip_c/model.safetensors"),
        (model, "model", "v0", "config.json", "clip_b/config.json"),
        (data, "dataset", None, "data/test-00001-of-00002.parquet", shards[1]),
        (data, "dataset", "refs/convert/parquet", "default/test/0000.parquet", shards[0]),
    ]:
        path = try_to_load_from_cache(repo_id, name, cache_dir=CACHE, revision=revision, repo_type=repo_type)
        assert isinstance(path, str), (repo_id, revision, name, path)
        assert open(path, "rb").read() == open(os.path.join(FIXTURES, source), "rb").read()
    print(f"huggingface_hub {huggingface_hub.__version__}: {CACHE}")
    print(f"  {model}: main {main_model}, v0 {v0}")
    print(f"  {data}: main {main_data}, refs/convert/parquet {converted}")


if __name__ == "__main__":
    main()
