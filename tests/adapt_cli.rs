//! `wemoe-engine adapt` end to end: the entropy goes down, only the routers change, a run killed with
//! SIGKILL or stopped by Ctrl-C and resumed ends byte-identical to an uninterrupted one, and bad input is
//! refused clearly.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};

fn base_args(out: &Path, steps: u64) -> Vec<String> {
    let f = |p: &str| s(&fixture(p)).to_string();
    vec![
        "adapt".into(),
        "--model".into(),
        f("wemoe/fusionbench_d2"),
        "--heads".into(),
        f("adapt/heads.safetensors"),
        "--task".into(),
        format!("left={}", f("adapt/left.safetensors")),
        "--task".into(),
        format!("right={}", f("adapt/right.safetensors")),
        "--out".into(),
        s(out).into(),
        "--steps".into(),
        steps.to_string(),
        "--batch-size".into(),
        "3".into(),
        "--lr".into(),
        "1e-3".into(),
        "--quiet".into(),
    ]
}

fn run(args: &[String]) -> (bool, String) {
    let (ok, _, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (ok, err)
}

/// A run of `steps` on the fixture, in a scratch folder (kept while the first is held): the folder and the output.
fn adapted(steps: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapted");
    let (ok, err) = run(&base_args(&out, steps));
    assert!(ok, "{err}");
    (tmp, out)
}

/// The summed entropy of the fixture's tasks (whole sets) under `model`.
fn entropy(model: &Path) -> f64 {
    use wemoe_engine::autograd::entropy_loss_and_router_gradients;
    use wemoe_engine::device::CpuBackend;
    use wemoe_engine::model::{Heads, ImageEncoder, Routing};
    let be = CpuBackend::new();
    let dir = ModelDir::open(model).unwrap();
    let encoder = ImageEncoder::load(&be, &dir).unwrap();
    let heads = Heads::open(&be, &fixture("adapt/heads.safetensors")).unwrap();
    let classifier = heads.classifier(&encoder, &dir.path).unwrap();
    let tasks = adapt_tasks(&heads);
    entropy_loss_and_router_gradients(&be, &encoder, &classifier, &tasks, Routing::Sample).unwrap().0
}

#[test]
fn adaptation_lowers_the_entropy_and_changes_only_the_routers() {
    let (tmp, out) = adapted(40);
    let (before, after) = (entropy(&fixture("wemoe/fusionbench_d2")), entropy(&out));
    assert!(after < before - 0.05, "entropy {before} -> {after}");
    let (a, b) = (ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap(), ModelDir::open(&out).unwrap());
    assert_eq!(a.store.names().collect::<Vec<_>>(), b.store.names().collect::<Vec<_>>());
    for name in a.store.names() {
        let same = a.store.get_any(name).unwrap().host().unwrap() == b.store.get_any(name).unwrap().host().unwrap();
        assert_eq!(same, !name.contains(".mlp.gate."), "{name}");
    }
    // config.json records the run, and info says it; adapting again adds a second record.
    let record = |steps: u64| {
        serde_json::json!({
            "tool": format!("wemoe-engine {}", env!("CARGO_PKG_VERSION")),
            "steps": steps, "lr": 1e-3, "batch_size": 3, "routing": "sample", "schedule": "constant", "seed": 0,
            "tasks": ["left", "right"],
        })
    };
    assert_eq!(b.json["adaptation"], serde_json::json!([record(40)]));
    let again = tmp.path().join("again");
    let mut args = base_args(&again, 2);
    args[2] = s(&out).into();
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(ModelDir::open(&again).unwrap().json["adaptation"], serde_json::json!([record(40), record(2)]));
    let (ok, text, err) = engine(&["info", s(&again)]);
    assert!(ok, "{err}");
    let line = "adapted     2 steps, Adam lr 0.001 (constant), 3 images per task per step, sample routing, seed 0, \
                on left, right by wemoe-engine";
    assert!(text.contains(line), "{text}");
}

#[test]
fn a_folder_of_unlabelled_images_adapts_as_its_image_folder_does() {
    // Adaptation reads no labels: the same images in the same order give the same routers.
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat");
    photos_flat(&flat);
    let adapted = |images: &Path, out: &Path| {
        let mut args = base_args(out, 3);
        args[6] = format!("left={}", s(images));
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let tree = adapted(&fixture("photos"), &tmp.path().join("tree"));
    assert!(tree == adapted(&flat, &tmp.path().join("flat_out")), "the models differ");
}

#[test]
fn a_batch_larger_than_a_task_or_a_resume_with_nothing_to_resume_runs_and_says_so() {
    // The fixture's tasks hold 4 images each: --batch-size 1000 draws what --batch-size 4 draws, every step.
    // --resume where no checkpoint is yet starts at step 0, as a run without it does.
    let tmp = tempfile::tempdir().unwrap();
    let adapted = |batch: &str, extra: &[&str]| {
        let out = tmp.path().join(batch);
        let mut args = base_args(&out, 3);
        args[14] = batch.into();
        args.retain(|a| a != "--quiet");
        args.extend(extra.iter().map(|a| a.to_string()));
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
        (std::fs::read(out.join("model.safetensors")).unwrap(), err, out)
    };
    let (whole, quiet, _) = adapted("4", &[]);
    let (large, told, out) = adapted("1000", &["--resume"]);
    assert!(whole == large, "the models differ");
    assert!(!quiet.contains("note:"), "{quiet}");
    for task in ["left", "right"] {
        let note =
            format!("note: task '{task}' has 4 images, fewer than --batch-size 1000; each step takes all of them");
        assert!(told.contains(&note), "{told}");
    }
    let checkpoint = out.join("adapt-checkpoint.safetensors");
    assert!(told.contains(&format!("note: --resume: {} does not exist yet; starting at step 0", s(&checkpoint))));
}

#[test]
fn a_damaged_checkpoint_says_how_to_start_again() {
    // A checkpoint cut short (a copy interrupted, say): refused in one line that says what to do instead.
    let (_tmp, out) = adapted(2);
    let checkpoint = out.join("adapt-checkpoint.safetensors");
    let bytes = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, &bytes[..bytes.len() / 2]).unwrap();
    let mut args = base_args(&out, 4);
    args.push("--resume".into());
    let (ok, err) = run(&args);
    let want = format!("--resume cannot continue it: start again with another --out, or remove {} first", s(&out));
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(!ok && last.starts_with(&format!("error: {}: ", s(&checkpoint))) && last.ends_with(&want), "{err}");
}

/// The step a checkpoint holds.
fn checkpoint_step(out: &Path) -> Option<u64> {
    let file = SafetensorsFile::open(&out.join("adapt-checkpoint.safetensors")).ok()?;
    let state: serde_json::Value = serde_json::from_str(file.metadata("state")?).ok()?;
    state["step"].as_u64()
}

#[test]
fn resume_after_sigkill_or_ctrl_c_ends_byte_identical_to_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 1500;
    let whole = tmp.path().join("whole");
    let (ok, err) = run(&base_args(&whole, steps));
    assert!(ok, "{err}");
    let killed = tmp.path().join("killed");
    let mut args = base_args(&killed, steps);
    args.extend(["--checkpoint-every".to_string(), "7".to_string(), "--routing".to_string(), "sample".to_string()]);
    let (at, _) = signal_after_checkpoint(&args, || checkpoint_step(&killed), 14, "KILL");
    assert!(at < steps, "the run finished before it could be killed (checkpoint at {at})");
    assert!(!killed.join("model.safetensors").exists());
    args.push("--resume".into());
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let read = |p: &PathBuf| std::fs::read(p.join("model.safetensors")).unwrap();
    assert!(read(&whole) == read(&killed), "resumed from step {at}: the models differ");

    // Ctrl-C: the command ends itself with the status a shell expects, its checkpoint complete and nothing
    // partial beside it, and resumes the same way.
    let interrupted = tmp.path().join("interrupted");
    let mut args = base_args(&interrupted, steps);
    args.extend(["--checkpoint-every".to_string(), "7".to_string()]);
    let (at, output) = signal_after_checkpoint(&args, || checkpoint_step(&interrupted), 21, "INT");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(at < steps, "the run finished before it could be interrupted (checkpoint at {at})");
    assert_eq!(output.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    let files: Vec<String> =
        std::fs::read_dir(&interrupted).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(files, ["adapt-checkpoint.safetensors"], "in the output folder");
    args.push("--resume".into());
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    assert!(read(&whole) == read(&interrupted), "resumed from step {at} after Ctrl-C: the models differ");
}

#[test]
fn bad_adaptation_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let check = |args: Vec<String>, culprit: &str| {
        let (ok, err) = run(&args);
        assert!(!ok && !err.contains("panicked"), "{err}");
        let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
        assert!(line.contains(culprit), "'{culprit}' not in: {err}");
        assert!(!out.join("model.safetensors").exists(), "no model may be written");
    };
    let mut a = base_args(&out, 5);
    a[6] = format!("up={}", s(&fixture("adapt/left.safetensors")));
    check(a, "heads.safetensors: no head for task 'up'");
    for lr in ["0", "-1", "nan"] {
        let mut a = base_args(&out, 5);
        a[16] = lr.to_string();
        check(a, "--lr must be a positive number");
    }
    check(base_args(&out, 0), "--steps must be positive");
    // A task with no images.
    let empty = tmp.path().join("empty.safetensors");
    let bytes = safetensors::serialize(
        vec![(
            "pixel_values",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![0, 3, 24, 24], &[]).unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(&empty, bytes).unwrap();
    let mut a = base_args(&out, 5);
    a[6] = format!("left={}", s(&empty));
    check(a, "empty.safetensors: holds no images");
    // A logit scale whose exp overflows, which made every logit infinite and the loss non-finite: refused where
    // the heads meet the model (a model that overflows on the images: `bad_input`).
    let heads = tmp.path().join("hot.safetensors");
    let file = SafetensorsFile::open(&fixture("adapt/heads.safetensors")).unwrap();
    let mut tensors: Vec<wemoe_engine::output::NamedTensor> = file
        .names()
        .map(|n| {
            let t = file.f32(n).unwrap();
            wemoe_engine::output::NamedTensor {
                name: n.into(),
                shape: t.shape().to_vec(),
                values: t.host().unwrap().to_vec(),
            }
        })
        .collect();
    tensors.iter_mut().find(|t| t.name == "logit_scale").unwrap().values = vec![100.0];
    wemoe_engine::output::write_safetensors(&heads, &tensors).unwrap();
    let mut a = base_args(&out, 5);
    a[4] = s(&heads).into();
    check(a, "hot.safetensors: logit_scale 100: its exp overflows f32, so every logit would be infinite");
    // A checkpoint, then a resume with other arguments: refused, the checkpoint kept.
    let (ok, err) = run(&[base_args(&out, 4), vec!["--checkpoint-every".into(), "2".into()]].concat());
    assert!(ok, "{err}");
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    let mut a = base_args(&out, 8);
    a[16] = "2e-3".into();
    a.push("--resume".into());
    check(a, "lr: 0.001 there, 0.002 now");
    assert_eq!(checkpoint_step(&out), Some(4), "the last good checkpoint is kept");
    check(base_args(&out, 8), "holds a checkpoint; pass --resume");
    // Resumed to fewer steps than the checkpoint holds: refused, not a model of 4 steps recorded as 2.
    let mut a = base_args(&out, 2);
    a.push("--resume".into());
    check(a, "adapt-checkpoint.safetensors is at step 4, past --steps 2; resume with --steps 4 or more");
}

#[test]
fn an_out_that_holds_a_model_is_refused_unless_it_is_an_adapt_run() {
    // `--out` the model's own folder used to replace the model it read; another model's folder, that model.
    // The model here is a copy, so a failure loses nothing.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("wemoe");
    std::fs::create_dir(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("wemoe/fusionbench_d2").join(file), model.join(file)).unwrap();
    }
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let args = |out: &Path| {
        let mut a = base_args(out, 2);
        a[2] = s(&model).into();
        a
    };
    let same = model.join("..").join("wemoe");
    let adamerging = tmp.path().join("adamerging");
    std::fs::create_dir(&adamerging).unwrap();
    std::fs::write(adamerging.join(wemoe_engine::merge::ADAMERGING_CHECKPOINT), b"").unwrap();
    for (out, want) in [
        (&adamerging, format!("--out {}: holds an AdaMerging run's checkpoint", s(&adamerging))),
        (&model, format!("--out {}: is the --model's directory", s(&model))),
        (&same, format!("--out {}: is the --model's directory", s(&same))),
        (&fixture("clip_b"), format!("--out {}: holds a model and no adapt checkpoint", s(&fixture("clip_b")))),
        (&model.join("config.json"), format!("--out {}: is a file", s(&model.join("config.json")))),
    ] {
        let (ok, err) = run(&args(out));
        assert!(!ok && err.trim_end().lines().last().unwrap().starts_with(&format!("error: {want}")), "{err}");
        assert!(!model.join(wemoe_engine::adapt::CHECKPOINT).exists(), "{err}");
    }
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before, "the model was changed");
    // Without --quiet the refusal is still the one line: it comes before the device's.
    let loud: Vec<String> = args(&model).into_iter().filter(|a| a != "--quiet").collect();
    let (ok, err) = run(&loud);
    assert!(!ok && err.trim_end().lines().count() == 1, "{err}");
    // An empty folder takes the run; a finished run's folder (model and checkpoint) takes its resumption.
    let out = tmp.path().join("empty");
    std::fs::create_dir(&out).unwrap();
    let (ok, err) = run(&args(&out));
    assert!(ok && out.join("model.safetensors").exists(), "{err}");
    let mut more = base_args(&out, 3);
    more[2] = s(&model).into();
    more.push("--resume".into());
    let (ok, err) = run(&more);
    assert!(ok && checkpoint_step(&out) == Some(3), "{err}");
}

#[test]
fn a_resume_takes_the_same_inputs_however_they_are_spelled() {
    // A checkpoint recorded its paths as given, so `--model m` resumed as `--model ./m/`, or with the same paths
    // from another folder, was refused as "made with other arguments".
    let tmp = tempfile::tempdir().unwrap();
    let here = tmp.path().join("here");
    std::fs::create_dir(&here).unwrap();
    for (link, target) in [("m", "wemoe/fusionbench_d2"), ("h.safetensors", "adapt/heads.safetensors")] {
        std::os::unix::fs::symlink(fixture(target), here.join(link)).unwrap();
    }
    std::fs::copy(fixture("adapt/left.safetensors"), here.join("left.safetensors")).unwrap();
    let args = |model: &str, heads: &str, left: &str, out: &str, steps: &str| -> Vec<String> {
        let task = format!("left={left}");
        let args = ["adapt", "--model", model, "--heads", heads, "--task", &task, "--out", out, "--steps", steps];
        let rest = ["--checkpoint-every", "1", "--batch-size", "3", "--device", "cpu", "--quiet"];
        args.iter().chain(&rest).map(|a| a.to_string()).collect()
    };
    let in_folder = |folder: &Path, args: Vec<String>| {
        let out = engine_command().args(&args).current_dir(folder).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = in_folder(&here, args("m", "h.safetensors", "left.safetensors", "out", "1"));
    assert!(ok, "{err}");
    // The same inputs spelled otherwise, from another folder.
    let at = |name: &str| format!("{}/./{name}", s(&here));
    let (model, heads, left, out) =
        (at("m/"), s(&fixture("adapt/heads.safetensors")).to_string(), at("left.safetensors"), at("out"));
    let (ok, err) = in_folder(tmp.path(), [args(&model, &heads, &left, &out, "2"), vec!["--resume".into()]].concat());
    assert!(ok && checkpoint_step(&here.join("out")) == Some(2), "{err}");
    // Another file is still another input, even with the same bytes.
    std::fs::copy(here.join("left.safetensors"), here.join("other.safetensors")).unwrap();
    let other = [args("m", "h.safetensors", "other.safetensors", "out", "3"), vec!["--resume".into()]].concat();
    let (ok, err) = in_folder(&here, other);
    assert!(!ok && err.contains("was made with other arguments (tasks: "), "{err}");
}

#[test]
fn info_prints_the_command_that_continues_a_run_whose_model_is_not_written() {
    // A run killed after its last checkpoint, or whose disk filled as it wrote the model: `info` of its folder says
    // how far it got and prints the command that continues it, which, run by a shell from another folder, writes
    // the same model as the uninterrupted run. A folder name with a space, and the cosine schedule, whose length
    // the fingerprint holds.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("my run");
    let mut args = base_args(&out, 2);
    args.extend(["--schedule", "cosine", "--checkpoint-every", "1", "--seed", "3"].map(String::from));
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let model = std::fs::read(out.join("model.safetensors")).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::remove_file(out.join(file)).unwrap();
    }
    let (ok, json, err) = engine(&["info", "--json", s(&out.join(wemoe_engine::adapt::CHECKPOINT))]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (
            report["kind"].as_str(),
            report["step"].as_u64(),
            report["steps"].as_u64(),
            report["checkpoint_every"].as_u64()
        ),
        (Some("adapt checkpoint"), Some(2), Some(2), Some(1))
    );
    assert_eq!(report["precision"], "f32", "the run's precision is recorded");
    let resume: Vec<&str> = report["resume"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    for pair in
        [["--schedule", "cosine"], ["--seed", "3"], ["--lr", "0.001"], ["--steps", "2"], ["--checkpoint-every", "1"]]
    {
        assert!(resume.windows(2).any(|w| w == pair), "{pair:?} not in {resume:?}");
    }
    // Given as a model meanwhile, the folder says what it holds, and where to look.
    let (images, embeds) = (fixture("adapt/left.safetensors"), tmp.path().join("e.safetensors"));
    let (ok, _, err) = engine(&["embed", "--model", s(&out), "--images", s(&images), "--out", s(&embeds)]);
    let holds = "holds a run's checkpoint (adapt-checkpoint.safetensors) but no model yet; `wemoe-engine info` of";
    assert!(!ok && err.contains(holds), "{err}");
    let err = run_the_resume_command_info_prints(&out);
    assert!(err.contains("every step from its checkpoint"), "{err}");
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == model, "the resumed run's model differs");
}

#[test]
fn a_resume_in_another_precision_says_its_steps_differ() {
    // A checkpoint records its run's --precision; continuing it in another one is allowed (a GPU's bf16 run finished
    // on a CPU) but said, since the remaining steps are not the first run's. The checkpoint here is an f32 run's,
    // its record changed to bf16, so that the test needs no bf16 unit.
    use wemoe_engine::output::{write_safetensors_with_metadata, NamedTensor};
    let (_tmp, out) = adapted(2);
    let path = out.join(wemoe_engine::adapt::CHECKPOINT);
    let file = SafetensorsFile::open(&path).unwrap();
    let state = file.metadata("state").unwrap().to_string();
    assert!(state.contains(r#""precision":"f32""#), "{state}");
    let tensors: Vec<NamedTensor> = file
        .names()
        .map(|name| {
            let t = file.f32(name).unwrap();
            NamedTensor { name: name.to_string(), shape: t.shape().to_vec(), values: t.host().unwrap().to_vec() }
        })
        .collect();
    let bf16 = state.replace(r#""precision":"f32""#, r#""precision":"bf16""#);
    drop(file);
    write_safetensors_with_metadata(&path, &tensors, [("state".to_string(), bf16)].into()).unwrap();
    // Notes show without --quiet.
    let resume = |steps| -> Vec<String> {
        let args = base_args(&out, steps).into_iter().filter(|a| a != "--quiet");
        args.chain(["--resume".to_string()]).collect()
    };
    let (ok, err) = run(&resume(3));
    let note = "note: --resume: the checkpoint was made with --precision bf16, this run computes in f32: its remaining";
    assert!(ok && err.contains(note), "{err}");
    // Resumed in its own precision (the checkpoint is now this f32 run's), it says nothing of it.
    let (ok, err) = run(&resume(4));
    assert!(ok && err.contains("wrote") && !err.contains("--precision"), "{err}");
}

#[test]
fn softmax_routers_over_one_expert_are_noted_by_merge_and_adapt() {
    // A softmax over one expert is 1 whatever the router computes: the merge and the run go ahead (FusionBench
    // allows them), each with a note, and the adapted model is the merged one.
    let tmp = tempfile::tempdir().unwrap();
    let merged = |name: &str, activation: &str, experts: &[&str]| {
        let out = tmp.path().join(name);
        let (pretrained, out_arg) = (s(&fixture("wemoe/pretrained")).to_string(), s(&out).to_string());
        let mut args = vec!["merge", "--pretrained", &pretrained, "--router-activation", activation, "--out", &out_arg];
        let experts: Vec<String> =
            experts.iter().map(|e| format!("{e}={}", s(&fixture(&format!("wemoe/{e}"))))).collect();
        experts.iter().for_each(|e| args.extend(["--expert", e.as_str()]));
        let (ok, _, err) = engine(&args);
        assert!(ok, "{err}");
        (out, err)
    };
    let note = "softmax routers over one expert give it weight 1 whatever the input: the routers have no effect, \
                and adapt has nothing to learn";
    let (alike, err) = merged("alike", "softmax", &["red"]);
    assert!(err.contains(&format!("note: {note}")), "{err}");
    for (name, activation, experts) in [("identity", "identity", &["red"][..]), ("two", "softmax", &["red", "green"])] {
        let (_, err) = merged(name, activation, experts);
        assert!(!err.contains("note:"), "{activation} over {experts:?}: {err}");
    }
    let out = tmp.path().join("adapted");
    let mut args = base_args(&out, 2);
    args[2] = s(&alike).into();
    args.retain(|a| a != "--quiet");
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("note: the model's {note}")), "{err}");
    let (a, b) = (ModelDir::open(&alike).unwrap(), ModelDir::open(&out).unwrap());
    assert!(a.store.names().any(|n| n.contains(".mlp.gate.")), "the merged model's routers");
    for name in a.store.names() {
        let same = a.store.get_any(name).unwrap().host().unwrap() == b.store.get_any(name).unwrap().host().unwrap();
        assert!(same, "{name} changed");
    }
}
