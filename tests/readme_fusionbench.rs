//! The README's "From FusionBench" commands, run as written (the adaptation cut to 2 steps) against a
//! Hugging Face cache laid out as huggingface_hub lays it out (tests/fixtures/hf_cache), holding every Hub name
//! they use with tiny stand-ins behind them: the fixture CLIP for each expert, a full CLIP of the same vision tower
//! with the heads fixture's text tower for the pretrained model, the fixture parquet split for each dataset. The
//! README stays true to the command line and the cache lookup.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wemoe_engine::checkpoint::TensorStore;
use wemoe_engine::output::{write_safetensors, NamedTensor};

/// The shell block of the README's "From FusionBench" section.
fn readme_block() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## From FusionBench").nth(1).expect("the README has a From FusionBench section");
    let block = section.split("```sh\n").nth(1).expect("with a sh block");
    block.split("```").next().unwrap().to_string()
}

/// The block's commands as words: continuation lines joined, `tasks=(…)` read, `"${tasks[@]}"` expanded; the
/// Python line (tools/fusionbench_classes.py) left out, its class lists written by the test.
fn engine_commands(block: &str) -> Vec<Vec<String>> {
    let joined = block.replace("\\\n", " ");
    let (mut tasks, mut commands) = (Vec::new(), Vec::new());
    let mut lines = joined.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("tasks=(") {
            let mut words = rest.to_string();
            while !words.contains(')') {
                words.push(' ');
                words.push_str(lines.next().expect("tasks=( … ) closes"));
            }
            tasks = words.split(')').next().unwrap().split_whitespace().map(String::from).collect();
        } else if line.starts_with("wemoe-engine ") {
            let words = line.split_whitespace().skip(1).flat_map(|w| match w {
                "\"${tasks[@]}\"" => tasks.clone(),
                _ => vec![w.to_string()],
            });
            commands.push(words.collect());
        } else {
            let python = line.contains("tools/fusionbench_classes.py");
            assert!(line.is_empty() || python, "a line the test cannot run: {line}");
        }
    }
    commands
}

/// Repository `repo` of `kind` (`models`, `datasets`) in `cache` with `files` (its name → a fixture) at `main`.
fn cached_repo(cache: &Path, kind: &str, repo: &str, files: &[(String, PathBuf)]) {
    let folder = cache.join(format!("{kind}--{}", repo.replace('/', "--")));
    let commit = format!("{:040x}", files.len() * 7919 + repo.len());
    for (i, (name, source)) in files.iter().enumerate() {
        let blob = folder.join("blobs").join(format!("{i:064x}"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(source, &blob).unwrap();
        let pointer = folder.join("snapshots").join(&commit).join(name);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        let up = "../".repeat(name.matches('/').count() + 2);
        std::os::unix::fs::symlink(format!("{up}blobs/{i:064x}"), &pointer).unwrap();
    }
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), &commit).unwrap();
}

/// FusionBench 0.2.33's `modelpool/CLIPVisionModelPool/clip-vit-base-patch32_TA8.yaml` (its tasks in order,
/// each model `tanganke/clip-vit-base-patch32_<task>`) and each task's `dataset/image_classification/test`
/// config (`datasets.load_dataset` path, config and split), as the README names them.
const TA8: [(&str, &str); 8] = [
    ("sun397", "tanganke/sun397"),
    ("stanford-cars", "tanganke/stanford_cars"),
    ("resisc45", "tanganke/resisc45"),
    ("eurosat", "tanganke/eurosat"),
    ("svhn", "svhn:cropped_digits/test"),
    ("gtsrb", "tanganke/gtsrb"),
    ("mnist", "mnist"),
    ("dtd", "tanganke/dtd"),
];

/// A full CLIPModel in `dir` standing for openai/clip-vit-base-patch32: clip_c's vision tower (so that the experts,
/// clip_c itself, merge with it), heads_tool's text tower and tokenizer, and projections into 24 dimensions.
fn full_clip(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    let json =
        |path: PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() };
    let (vision, text) = (json(fixture("clip_c/config.json")), json(fixture("heads_tool/clip/config.json")));
    let config = serde_json::json!({
        "model_type": "clip", "projection_dim": 24, "logit_scale_init_value": 2.6592,
        "vision_config": vision, "text_config": text["text_config"],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors = Vec::new();
    let mut take = |store: &TensorStore, name: &str, as_name: String| {
        let t = store.get_any(name).unwrap();
        tensors.push(NamedTensor { name: as_name, shape: t.shape().to_vec(), values: t.host().unwrap().to_vec() });
    };
    let clip_c = TensorStore::open_dir(&fixture("clip_c")).unwrap();
    for name in clip_c.names().map(String::from).collect::<Vec<_>>() {
        // The store names an unprefixed checkpoint's tensors as HF's CLIPVisionModel does, under vision_model.
        take(&clip_c, &name, name.clone());
    }
    let text = TensorStore::open_dir(&fixture("heads_tool/clip")).unwrap();
    for name in text.names().filter(|n| n.starts_with("text")).map(String::from).collect::<Vec<_>>() {
        take(&text, &name, name.clone());
    }
    let projection = (0..24 * 40).map(|i| ((i * 13 % 17) as f32 - 8.0) / 40.0).collect();
    tensors.push(NamedTensor { name: "visual_projection.weight".into(), shape: vec![24, 40], values: projection });
    tensors.push(NamedTensor { name: "logit_scale".into(), shape: vec![], values: vec![2.6592] });
    write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture("heads_tool/clip").join(f), dir.join(f)).unwrap();
    }
    ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
        .iter()
        .map(|f| (f.to_string(), dir.join(f)))
        .collect()
}

#[test]
fn the_readmes_fusionbench_commands_run_as_written() {
    let commands = engine_commands(&readme_block());
    let verbs: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(verbs, ["merge", "heads", "adapt", "eval"]);
    let values = |command: &[String], flag: &str| -> Vec<String> {
        command.windows(2).filter(|p| p[0] == flag).map(|p| p[1].clone()).collect()
    };
    let experts: Vec<String> = TA8.iter().map(|(t, _)| format!("{t}=tanganke/clip-vit-base-patch32_{t}")).collect();
    assert_eq!(values(&commands[0], "--expert"), experts, "FusionBench's TA8 model pool");
    assert_eq!(values(&commands[0], "--pretrained"), ["openai/clip-vit-base-patch32"]);
    assert_eq!(values(&commands[1], "--clip"), ["openai/clip-vit-base-patch32"]);
    let lists: Vec<String> = TA8.iter().map(|(t, _)| format!("{t}=ta8/{t}.json")).collect();
    assert_eq!(values(&commands[1], "--task"), lists, "tools/fusionbench_classes.py's files for the TA8 tasks");
    let joined = readme_block().replace("\\\n", " ");
    let exported = joined.lines().find(|l| l.contains("tools/fusionbench_classes.py")).unwrap();
    let exported: Vec<&str> = exported.split_whitespace().skip_while(|w| *w != "ta8").skip(1).collect();
    assert_eq!(exported, TA8.map(|(t, _)| t), "the tasks whose class lists the Python line writes into ta8/");
    let data: Vec<String> = TA8.iter().map(|(t, d)| format!("{t}={d}")).collect();
    for command in &commands[2..] {
        assert_eq!(values(command, "--task"), data, "FusionBench's TA8 test sets");
    }

    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let clip: Vec<(String, PathBuf)> =
        ["config.json", "model.safetensors"].iter().map(|f| (f.to_string(), fixture("clip_c").join(f))).collect();
    let shards = |folder: &str| -> Vec<(String, PathBuf)> {
        (0..2)
            .map(|i| {
                let name = format!("test-0000{i}-of-00002.parquet");
                (format!("{folder}/{name}"), fixture("parquet/two_shards").join(name))
            })
            .collect()
    };
    let mut tasks = Vec::new();
    for command in &commands {
        for pair in command.windows(2) {
            let Some((task, name)) = pair[1].split_once('=') else { continue };
            match pair[0].as_str() {
                "--expert" => cached_repo(&cache, "models", name, &clip),
                "--task" if command[0] == "adapt" => {
                    tasks.push(task.to_string());
                    let repo = name.split(':').next().unwrap();
                    // SVHN as its cache holds it: one folder per config.
                    let files = match name.split_once(':') {
                        Some((_, split)) => {
                            let config = split.split('/').next().unwrap();
                            [shards(config), shards("full_numbers")].concat()
                        }
                        None if !repo.contains('/') => shards(repo),
                        None => shards("data"),
                    };
                    cached_repo(&cache, "datasets", repo, &files);
                }
                _ => {}
            }
        }
    }
    cached_repo(&cache, "models", "openai/clip-vit-base-patch32", &full_clip(&tmp.path().join("full_clip")));
    assert_eq!(tasks.len(), 8, "the eight tasks: {tasks:?}");

    // What tools/fusionbench_classes.py writes, over the fixture data's three classes.
    std::fs::create_dir(tmp.path().join("ta8")).unwrap();
    for (task, _) in TA8 {
        let list =
            serde_json::json!({"task": task, "classes": ["cat", "dog", "fish"], "templates": ["a photo of a {}."]});
        std::fs::write(tmp.path().join(format!("ta8/{task}.json")), list.to_string()).unwrap();
    }

    for command in &commands {
        let mut args = command.clone();
        if args[0] == "adapt" {
            args.extend(["--steps".into(), "2".into()]);
        }
        let out = engine_command()
            .args(["--device", "cpu"])
            .args(&args)
            .env("HF_HUB_CACHE", &cache)
            .env_remove(wemoe_engine::device::op_times::ENV)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stderr}");
        if args[0] == "heads" {
            assert!(stderr.contains("wrote heads-ta8.safetensors: 8 heads, projection [24, 40]"), "{stderr}");
        }
        if args[0] == "eval" {
            for task in &tasks {
                assert!(stdout.lines().any(|l| l.starts_with(task.as_str())), "eval lists {task}: {stdout}");
            }
            assert!(stderr.contains("note: svhn: split test of the Hugging Face cache's snapshot"), "{stderr}");
        }
    }
}
