//! `wemoe-engine heads`: zero-shot heads from a CLIP model's text tower equal FusionBench's (its
//! `HFCLIPClassifier`, fixtures of tools/make_heads_fixtures.py), and the engine's CLIP tokenizer gives
//! transformers' ids with CLIP's own merges (tools/make_tokenizer_fixtures.py).

mod common;

use std::path::Path;

use common::*;
use wemoe_engine::checkpoint::SafetensorsFile;
use wemoe_engine::text::ClipTokenizer;

/// From vocab.json and merges.txt, and from the `tokenizers` library's tokenizer.json alone.
#[test]
fn the_tokenizer_gives_transformers_ids_with_clips_merges() {
    let text = std::fs::read_to_string(fixture("clip_tokenizer/expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = expected["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 20, "the fixture's prompts");
    for dir in ["clip_tokenizer", "clip_tokenizer/tokenizer_json"] {
        let tokenizer = ClipTokenizer::open(&fixture(dir)).unwrap();
        for prompt in prompts {
            let text = prompt["text"].as_str().unwrap();
            let want: Vec<u32> = prompt["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(tokenizer.encode(text).unwrap(), want, "{dir}: {text:?}");
        }
    }
}

/// Runs `heads` with the heads_tool model and `args`, into `out`; panics with stderr on failure.
fn heads(out: &Path, args: &[&str]) -> String {
    let clip = fixture("heads_tool/clip");
    let mut all = vec!["heads", "--clip", s(&clip), "--out", s(out)];
    all.extend_from_slice(args);
    let (ok, _, err) = engine(&all);
    assert!(ok, "{err}");
    err
}

/// `file`'s tensor `name`, as (shape, values).
fn tensor(file: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = SafetensorsFile::open(file).unwrap();
    let t = f.f32(name).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
    (t.shape().to_vec(), t.host().unwrap().to_vec())
}

#[test]
fn heads_equal_fusionbenchs_zero_shot_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("heads.safetensors");
    let mnist = fixture("heads_tool/mnist.json");
    let (photos, pets) = (fixture("photos"), fixture("parquet/two_shards"));
    let (mnist, photos, pets) =
        (format!("mnist={}", s(&mnist)), format!("photos={}", s(&photos)), format!("pets={}", s(&pets)));
    let err = heads(&out, &["--task", &mnist, "--task", &photos, "--task", &pets]);
    assert!(err.contains("wrote") && err.contains("3 heads"), "{err}");
    let want = fixture("heads_tool/heads.safetensors");
    for name in ["head.mnist", "head.photos", "head.pets", "visual_projection.weight", "logit_scale"] {
        let (got_shape, got) = tensor(&out, name);
        let (want_shape, want) = tensor(&want, name);
        assert_eq!(got_shape, want_shape, "{name}");
        assert_close(name, &got, &want);
    }
    let classes = |file: &Path| -> serde_json::Value {
        serde_json::from_str(SafetensorsFile::open(file).unwrap().metadata("classes").unwrap()).unwrap()
    };
    assert_eq!(classes(&out), classes(&want), "the class names eval matches labels by");

    // A Hub dataset name stands for its cached parquet files: the same head, byte for byte.
    let by_name = tmp.path().join("by_name.safetensors");
    let (ok, _, err) = engine_with_env(
        &[("HF_HUB_CACHE", s(&fixture("hf_cache")))],
        &[
            "heads",
            "--clip",
            s(&fixture("heads_tool/clip")),
            "--task",
            "pets=wemoe-fixtures/pets",
            "--out",
            s(&by_name),
        ],
    );
    assert!(ok && err.contains("note: wemoe-fixtures/pets: split test"), "{err}");
    assert_eq!(tensor(&by_name, "head.pets"), tensor(&out, "head.pets"));
}

/// dtd: 47 classes × 8 templates, prompts of many lengths averaged per class; through the one-layer text tower
/// and through clip_deep's three (where the causal mask shapes the pooled token's output, GELU, and pooling
/// at the largest id for `eos_token_id` 2).
#[test]
fn templates_are_averaged_as_fusionbench_averages_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dtd = format!("dtd={}", s(&fixture("heads_tool/dtd.json")));
    for (clip, want) in [("clip", "dtd.safetensors"), ("clip_deep", "clip_deep_dtd.safetensors")] {
        let out = tmp.path().join(want);
        let (ok, _, err) =
            engine(&["heads", "--clip", s(&fixture(&format!("heads_tool/{clip}"))), "--task", &dtd, "--out", s(&out)]);
        assert!(ok && err.contains("47 classes    8 templates"), "{clip}: {err}");
        // The 8 templates' beginnings run once for the 47 classes: fewer tokens than the prompts hold.
        let counts = err.lines().find(|l| l.starts_with("376 prompts, ")).unwrap_or_else(|| panic!("{err}"));
        let numbers: Vec<usize> = counts.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert!(numbers.len() == 3 && numbers[2] < numbers[1], "{clip}: {counts}");
        let (shape, got) = tensor(&out, "head.dtd");
        let (want_shape, want) = tensor(&fixture(&format!("heads_tool/{want}")), "head.dtd");
        assert_eq!(shape, want_shape, "{clip}");
        assert_close(&format!("{clip} head.dtd"), &got, &want);
    }
}

#[test]
fn template_flags_replace_every_tasks_templates() {
    let tmp = tempfile::tempdir().unwrap();
    let names = tmp.path().join("digits.txt");
    std::fs::write(&names, "0\n1\n2\n\n3\n4\n5\n6\n7\n8\n 9 \n").unwrap();
    let out = tmp.path().join("heads.safetensors");
    // mnist.json's own template, given on the command line for a list of names without one.
    let task = format!("mnist={}", s(&names));
    heads(&out, &["--task", &task, "--template", "a photo of the number: \"{}\"."]);
    let (_, want) = tensor(&fixture("heads_tool/heads.safetensors"), "head.mnist");
    assert_close("head.mnist", &tensor(&out, "head.mnist").1, &want);
    let classes = SafetensorsFile::open(&out).unwrap().metadata("classes").unwrap().to_string();
    assert_eq!(classes, r#"{"mnist":["0","1","2","3","4","5","6","7","8","9"]}"#, "names trimmed, blank lines skipped");
    // The default template ("a photo of a {}") is not mnist's: the head differs.
    let other = tmp.path().join("default.safetensors");
    heads(&other, &["--task", &task]);
    assert!(rel_err(&tensor(&other, "head.mnist").1, &want) > 1e-2, "the template changes the head");
}

#[test]
fn bad_heads_input_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let twice = write("twice.txt", "cat\ndog\ncat\n");
    let no_classes = write("no_classes.json", "{\"templates\": [\"a {}\"]}");
    let long = write("long.txt", &format!("{}\n", ["abc"; 80].join(" ")));
    let empty_dir = tmp.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let flat = tmp.path().join("flat");
    photos_flat(&flat);
    let clip = fixture("heads_tool/clip");
    let pets = format!("pets={}", s(&fixture("parquet/two_shards")));
    let task = |name: &str, path: &Path| format!("{name}={}", s(path));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--clip".into(), s(&fixture("clip_c")).into(), "--task".into(), pets.clone()],
            "CLIPVisionModel; zero-shot heads need the full CLIPModel",
        ),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), "sun397".into()],
            "tools/fusionbench_classes.py sun397 > sun397.json",
        ),
        (
            vec![
                "--clip".into(),
                s(&clip).into(),
                "--task".into(),
                pets.clone(),
                "--template".into(),
                "a photo".into(),
            ],
            "--template \"a photo\": no {} for the class name",
        ),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), task("pets", &twice)],
            "the class name \"cat\" appears twice",
        ),
        (vec!["--clip".into(), s(&clip).into(), "--task".into(), task("pets", &no_classes)], "no \"classes\" list"),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), task("long", &long)],
            "in template \"a photo of a {}\": 247 tokens, more than the text tower's 77 positions",
        ),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), pets.clone(), "--task".into(), pets.clone()],
            "--task 'pets' is given twice",
        ),
        (
            vec![
                "--clip".into(),
                s(&clip).into(),
                "--tokenizer".into(),
                s(&empty_dir).into(),
                "--task".into(),
                pets.clone(),
            ],
            "empty: no tokenizer here (vocab.json and merges.txt, or tokenizer.json",
        ),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), task("pixels", &fixture("pixels_a.safetensors"))],
            "a safetensors dataset, which names no classes",
        ),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), task("loose", &flat)],
            "flat: images without class subfolders name no classes",
        ),
        (
            vec!["--clip".into(), s(&clip).into(), "--task".into(), task("one", &fixture("photos").join(PHOTOS[0]))],
            "china_301x217.jpg: an image names no classes",
        ),
        (
            vec!["--device".into(), "cuda".into(), "--clip".into(), s(&clip).into(), "--task".into(), pets.clone()],
            "the text tower runs on the CPU",
        ),
    ];
    for (args, want) in cases {
        let out = tmp.path().join("heads.safetensors");
        let mut all: Vec<&str> = vec!["heads", "--out", s(&out)];
        all.extend(args.iter().map(String::as_str));
        // --device is global: it may come before the subcommand or after it.
        let (ok, _, err) = engine(&all);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!out.exists(), "{args:?} wrote a file");
    }
}
