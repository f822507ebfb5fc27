//! Hub names on the command line (`OWNER/NAME[@REVISION][:SPLIT]`), found in a Hugging Face cache written by
//! huggingface_hub's own functions (tests/fixtures/hf_cache, tools/make_hf_cache_fixtures.py): they open the
//! same files as the paths they stand for.

mod common;

use common::*;

/// The engine with `HF_HUB_CACHE` at the fixture cache.
fn with_cache(args: &[&str]) -> (bool, String, String) {
    engine_with_env(&[("HF_HUB_CACHE", s(&fixture("hf_cache")))], args)
}

/// `info --json` without its `path`.
fn info(json: &str) -> serde_json::Value {
    let mut info: serde_json::Value = serde_json::from_str(json).unwrap();
    info.as_object_mut().unwrap().remove("path").expect("info names the model's path");
    info
}

#[test]
fn a_model_name_opens_its_cached_snapshot() {
    let (_, clip_b, _) = engine(&["info", s(&fixture("clip_b")), "--json"]);
    let (_, clip_c, _) = engine(&["info", s(&fixture("clip_c")), "--json"]);
    for (spec, want, commit) in [
        ("wemoe-fixtures/clip-c", &clip_c, "53304e10a2a6"),
        ("wemoe-fixtures/clip-c@main", &clip_c, "53304e10a2a6"),
        ("wemoe-fixtures/clip-c@v0", &clip_b, "4c33fcf1c13c"),
        ("wemoe-fixtures/clip-c@4c33fcf", &clip_b, "4c33fcf1c13c"),
        ("wemoe-fixtures/clip-c@4c33fcf1c13c5177f5ea9eb91a2e19efac655fdd", &clip_b, "4c33fcf1c13c"),
    ] {
        let (ok, out, err) = with_cache(&["info", spec, "--json"]);
        assert!(ok, "{spec}: {err}");
        assert_eq!(info(&out), info(want), "{spec}");
        assert!(
            err.starts_with(&format!("note: {spec}: the Hugging Face cache's snapshot {commit} (")),
            "{spec}: {err}"
        );
    }
    let (ok, _, err) = with_cache(&["--quiet", "info", "wemoe-fixtures/clip-c"]);
    assert!(ok && err.is_empty(), "--quiet keeps the note back: {err}");
}

#[test]
fn a_dataset_name_reads_its_split_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = |name: &str| tmp.path().join(name);
    let embed = |model: &str, images: &str, file: &str| {
        let (ok, _, err) =
            with_cache(&["--device", "cpu", "embed", "--model", model, "--images", images, "--out", s(&out(file))]);
        assert!(ok, "{images}: {err}");
        err
    };
    embed(s(&fixture("clip_c")), s(&fixture("parquet/two_shards")), "paths.safetensors");
    let err = embed("wemoe-fixtures/clip-c", "wemoe-fixtures/pets", "names.safetensors");
    assert!(
        err.contains("note: wemoe-fixtures/pets: split test of the Hugging Face cache's snapshot a18715d364f6"),
        "{err}"
    );
    embed("wemoe-fixtures/clip-c", "wemoe-fixtures/pets@refs/convert/parquet:test", "converted.safetensors");
    let want = std::fs::read(out("paths.safetensors")).unwrap();
    for file in ["names.safetensors", "converted.safetensors"] {
        assert!(std::fs::read(out(file)).unwrap() == want, "{file} differs from the paths' output");
    }
}

#[test]
fn an_existing_path_wins_over_a_hub_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wemoe-fixtures/clip-c");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("clip_b").join(file), dir.join(file)).unwrap();
    }
    let out = engine_command()
        .args(["info", "wemoe-fixtures/clip-c", "--json"])
        .env("HF_HUB_CACHE", fixture("hf_cache"))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let (_, clip_b, _) = engine(&["info", s(&fixture("clip_b")), "--json"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(info(&String::from_utf8_lossy(&out.stdout)), info(&clip_b));
}

#[test]
fn a_hub_name_not_in_the_cache_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    // The model is a Hub name that resolves: what it stood for is not said when another argument is refused.
    let clip_c = "wemoe-fixtures/clip-c";
    let merged = tmp.path().join("m");
    for (args, expected) in [
        (vec!["info", "wemoe-fixtures/absent"], "models--wemoe-fixtures--absent does not exist"),
        (
            vec!["info", "wemoe-fixtures/clip-c@v9"],
            "revision v9 of wemoe-fixtures/clip-c is not in the cache (refs: main, v0; snapshots: 4c33fcf1c13c, \
             53304e10a2a6)",
        ),
        (
            vec!["embed", "--model", clip_c, "--images", "wemoe-fixtures/pets:validation", "--out", s(&out)],
            "no parquet split validation in ",
        ),
        (
            vec!["embed", "--model", clip_c, "--images", "wemoe-fixtures/pets@refs/convert/parquet:train"]
                .into_iter()
                .chain(["--out", s(&out)])
                .collect(),
            "(splits: test)",
        ),
        (
            vec!["merge", "--pretrained", clip_c, "--expert", "a=wemoe-fixtures/clip-c@nope", "--out", s(&merged)],
            "revision nope of wemoe-fixtures/clip-c",
        ),
    ] {
        let (ok, _, err) = with_cache(&args);
        let spec = args.iter().rev().find(|a| a.contains("wemoe-fixtures/")).unwrap();
        let spec = spec.split_once('=').map_or(*spec, |(_, v)| v);
        assert!(!ok && err.lines().count() == 1, "{args:?}: {err}");
        assert!(err.starts_with(&format!("error: {spec}: no such file or folder, nor a ")), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing written");
}

#[test]
fn doctor_names_the_cache_hub_names_resolve_in() {
    let (ok, out, err) = with_cache(&["doctor"]);
    let line = out.lines().find(|l| l.starts_with("hf cache")).unwrap_or_else(|| panic!("{out}{err}"));
    assert!(ok && line.ends_with("hf_cache (1 model, 1 dataset: Hub names resolve here)"), "{line}");
    let (_, out, _) = engine_with_env(&[("HF_HUB_CACHE", "/nonexistent/hub")], &["doctor"]);
    assert!(out.contains("hf cache    /nonexistent/hub (absent: Hub names have nothing to resolve to)"), "{out}");
}
