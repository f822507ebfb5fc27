//! AdaMerging against FusionBench's `LayerWiseMergedModel` and `TaskWiseMergedModel` (fixtures of
//! tools/make_adamerging_fixtures.py): the loss and its gradient with respect to every coefficient at the
//! initial 0.3, the coefficients and the merged model after 5 steps of its loop, and the command line.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile, TensorStore};
use wemoe_engine::device::CpuBackend;
use wemoe_engine::merge::{
    parameter_order, read_coefficients, AdaMerging, Expert, Granularity, ADAMERGING_CHECKPOINT, COEFFICIENTS_FILE,
    TASK_WISE_COLUMN,
};
use wemoe_engine::model::Heads;

const EXPERTS: [&str; 3] = ["red", "green", "blue"];

/// The gradient's tolerance: relative to its largest coefficient's.
const GRADIENT_REL_TOL: f64 = 1e-4;
/// The 5 steps' update, relative L2 (the tolerance issue 4 set for the routers' Adam steps).
const UPDATE_REL_L2_TOL: f64 = 2e-3;

fn experts() -> Vec<Expert> {
    EXPERTS
        .iter()
        .map(|n| Expert { name: n.to_string(), model: ModelDir::open(&fixture(&format!("wemoe/{n}"))).unwrap() })
        .collect()
}

/// FusionBench's parameter order, from the fixture's metadata.
fn fusionbench_order() -> Vec<String> {
    let file = SafetensorsFile::open(&fixture("adamerging/expected.safetensors")).unwrap();
    serde_json::from_str(file.metadata("parameters").unwrap()).unwrap()
}

/// `run`'s loss and gradient at the initial 0.3 on the fixture's tasks, the loss checked against FusionBench's
/// (`loss_key` in the fixture).
fn initial_gradient(be: &CpuBackend, run: &AdaMerging, loss_key: &str) -> BTreeMap<String, Vec<f32>> {
    let coefficients = run.initial(0.3);
    let model = run.model(be, &coefficients).unwrap();
    let heads = Heads::open(be, &fixture("adapt/heads.safetensors")).unwrap();
    let (loss, grads) = run.loss_and_gradient(be, &model, &coefficients, &heads, &adapt_tasks(&heads)).unwrap();
    let (_, want) = reference("adamerging/expected.safetensors", loss_key);
    assert!((loss - want[0] as f64).abs() <= 1e-5 * want[0] as f64, "{loss_key} {loss} against {}", want[0]);
    grads
}

#[test]
fn loss_and_coefficient_gradients_match_fusionbench() {
    let be = CpuBackend::new();
    let pretrained = ModelDir::open(&fixture("wemoe/pretrained")).unwrap();
    let experts = experts();
    let run = AdaMerging::new(&be, &pretrained, &experts).unwrap();
    assert_eq!(run.names(), fusionbench_order().as_slice(), "the coefficients' columns");
    assert_eq!(parameter_order(&pretrained.config), fusionbench_order());
    let grads = initial_gradient(&be, &run, "loss");
    let (shape, want) = reference("adamerging/expected.safetensors", "grad");
    assert_eq!(shape, [EXPERTS.len(), run.names().len()]);
    let got: Vec<f32> =
        (0..EXPERTS.len()).flat_map(|t| run.names().iter().map(|n| grads[n][t]).collect::<Vec<_>>()).collect();
    let e = rel_err(&got, &want);
    assert!(e <= GRADIENT_REL_TOL, "coefficient gradients off by {e:.3e} relative");
    // Every kind of tensor carries gradient: the embeddings, the norms, attention and the MLP.
    for (p, name) in run.names().iter().enumerate() {
        let column: Vec<f32> = (0..EXPERTS.len()).map(|t| want[t * run.names().len() + p]).collect();
        assert!(column.iter().any(|&g| g != 0.0), "FusionBench's gradient of {name} is 0: the fixture tests nothing");
    }
}

/// Task-wise AdaMerging (one coefficient per expert for the whole tower): its loss and gradient, the sum over
/// every tensor's contraction, as FusionBench's `TaskWiseMergedModel` gives them.
#[test]
fn task_wise_loss_and_gradient_match_fusionbench() {
    let be = CpuBackend::new();
    let pretrained = ModelDir::open(&fixture("wemoe/pretrained")).unwrap();
    let experts = experts();
    let run = AdaMerging::new(&be, &pretrained, &experts).unwrap().with_granularity(Granularity::TaskWise);
    assert_eq!(run.initial(0.3).names, [TASK_WISE_COLUMN]);
    let grads = initial_gradient(&be, &run, "task.loss");
    let (shape, want) = reference("adamerging/expected.safetensors", "task.grad");
    assert_eq!(shape, [EXPERTS.len()]);
    assert_eq!(grads.len(), 1, "one column");
    let e = rel_err(&grads[TASK_WISE_COLUMN], &want);
    assert!(e <= GRADIENT_REL_TOL, "task-wise gradients {:?} against {want:?}: {e:.3e}", grads[TASK_WISE_COLUMN]);
}

#[test]
fn five_task_wise_steps_on_the_command_line_match_fusionbenchs_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let out: PathBuf = tmp.path().join("adamerged");
    let (ok, _, err) = run(&command(&out, &["--steps", "5", "--granularity", "task-wise"]));
    assert!(ok, "{err}");
    assert!(err.contains("adamerging trained 3 coefficients (3 experts, task-wise) in 5 steps"), "{err}");
    let file = read_coefficients(&out.join(COEFFICIENTS_FILE)).unwrap();
    assert_eq!(file.granularity, Granularity::TaskWise);
    assert_eq!(file.parameters, fusionbench_order(), "the tensors the coefficients scale");
    let (_, want) = reference("adamerging/expected.safetensors", "task.adam5");
    let (du, dw): (Vec<f32>, Vec<f32>) = file.values.iter().zip(&want).map(|(g, w)| (g - 0.3, w - 0.3)).unzip();
    let e = rel_err(&du, &dw);
    assert!(e <= UPDATE_REL_L2_TOL, "the 5 steps' update {du:?} against {dw:?}: {e:.3e}");
    let ours = ModelDir::open(&out).unwrap();
    let want = TensorStore::open_file(&fixture("adamerging/expected.safetensors")).unwrap();
    let mut checked = 0;
    for name in want.names().filter_map(|n| n.strip_prefix("task.merged.")) {
        let g = ours.store.get_any(name).unwrap().host().unwrap().to_vec();
        let w = want.get_any(&format!("task.merged.{name}")).unwrap().host().unwrap().to_vec();
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{name}: off by {worst:.3e}");
        checked += 1;
    }
    assert_eq!(checked, 39);
    let (ok, text, err) = engine(&["info", s(&out)]);
    assert!(ok && text.contains("granularity task-wise"), "{text}{err}");
    let v = &file.values;
    let line =
        format!("coefficients task-wise ({COEFFICIENTS_FILE}): red {:.4}, green {:.4}, blue {:.4}\n", v[0], v[1], v[2]);
    assert!(text.contains(&line), "{line} in {text}");
}

/// `clamp_weights`: the model is merged at the coefficients clamped to [0, 1], so a clamped run at `λ` gives
/// the loss and, on the coefficients inside the range, the gradients of an unclamped run at `clamp(λ)`; the
/// coefficients outside it get none (torch's `clamp` passes the gradient on the closed range: 0 and 1 keep it).
#[test]
fn clamped_coefficients_merge_clamped_and_get_no_gradient_outside_the_range() {
    let be = CpuBackend::new();
    let pretrained = ModelDir::open(&fixture("wemoe/pretrained")).unwrap();
    let experts = experts();
    let plain = AdaMerging::new(&be, &pretrained, &experts).unwrap();
    let clamped = AdaMerging::new(&be, &pretrained, &experts).unwrap().with_clamp(true);
    let heads = Heads::open(&be, &fixture("adapt/heads.safetensors")).unwrap();
    let tasks = adapt_tasks(&heads);
    let mut raw = plain.initial(0.3);
    let values = [-0.4f32, 0.0, 0.7, 1.0, 1.6];
    for (p, v) in raw.values.values_mut().enumerate() {
        for (t, l) in v.iter_mut().enumerate() {
            *l = values[(p + 2 * t) % values.len()];
        }
    }
    let mut inside = raw.clone();
    for v in inside.values.values_mut() {
        v.iter_mut().for_each(|l| *l = l.clamp(0.0, 1.0));
    }
    let (loss, grads) =
        clamped.loss_and_gradient(&be, &clamped.model(&be, &raw).unwrap(), &raw, &heads, &tasks).unwrap();
    let (want_loss, want) =
        plain.loss_and_gradient(&be, &plain.model(&be, &inside).unwrap(), &inside, &heads, &tasks).unwrap();
    assert_eq!(loss, want_loss, "the clamped merge is the merge at the clamped coefficients");
    let (mut kept, mut zeroed) = (0, 0);
    for name in plain.names() {
        for (t, &l) in raw.values[name].iter().enumerate() {
            if (0.0..=1.0).contains(&l) {
                assert_eq!(grads[name][t], want[name][t], "{name}, expert {t} at {l}");
                kept += usize::from(want[name][t] != 0.0);
            } else {
                assert_eq!(grads[name][t], 0.0, "{name}, expert {t} at {l}: clamped, no gradient");
                zeroed += usize::from(want[name][t] != 0.0);
            }
        }
    }
    assert!(kept > 40 && zeroed > 40, "both cases carry weight: {kept} kept, {zeroed} zeroed");
}

/// The merge command line for AdaMerging on the fixtures, into `out`, with `extra` arguments.
fn command(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["merge", "--method", "adamerging", "--device", "cpu", "--pretrained"].iter().map(|a| a.to_string()).collect();
    args.push(s(&fixture("wemoe/pretrained")).into());
    for n in EXPERTS {
        args.extend(["--expert".to_string(), format!("{n}={}", s(&fixture(&format!("wemoe/{n}"))))]);
    }
    args.extend(["--heads".to_string(), s(&fixture("adapt/heads.safetensors")).into()]);
    for t in ["left", "right"] {
        args.extend(["--task".to_string(), format!("{t}={}", s(&fixture(&format!("adapt/{t}.safetensors"))))]);
    }
    args.extend(["--out".to_string(), s(out).into()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn run(args: &[String]) -> (bool, String, String) {
    engine(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn five_steps_on_the_command_line_match_fusionbenchs_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let out: PathBuf = tmp.path().join("adamerged");
    // Batches of 16 hold each task's 4 images whole, as the fixture's steps do.
    let (ok, _, err) = run(&command(&out, &["--steps", "5"]));
    assert!(ok, "{err}");
    assert!(err.contains("adamerging trained 117 coefficients (3 experts × 39 tensors) in 5 steps"), "{err}");
    assert!(err.contains(&format!("wrote {} (", out.display())) && err.contains(" parameters, 3 experts)"), "{err}");
    for t in ["left", "right"] {
        let note = format!("note: task '{t}' has 4 images, fewer than --batch-size 16; each step takes all of them");
        assert!(err.contains(&note), "{err}");
    }

    let file = read_coefficients(&out.join(COEFFICIENTS_FILE)).unwrap();
    assert_eq!(file.experts, EXPERTS);
    assert_eq!(file.parameters, fusionbench_order());
    assert_eq!(file.granularity, Granularity::LayerWise);
    let (names, got) = (file.parameters, file.values);
    let (_, want) = reference("adamerging/expected.safetensors", "adam5");
    // A key projection's bias shifts every score of a query alike, which softmax ignores: its gradient is 0,
    // and what either side computes for it is rounding noise (1e-12 to 1e-9 here), which Adam's normalised
    // step turns into moves of up to lr. Those coefficients are compared nowhere; they are the only ones.
    let (_, grad0) = reference("adamerging/expected.safetensors", "grad");
    let largest = grad0.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    let noise: Vec<bool> = grad0.iter().map(|g| g.abs() < 1e-6 * largest).collect();
    for (i, _) in noise.iter().enumerate().filter(|(_, n)| **n) {
        let name = &names[i % names.len()];
        assert!(name.ends_with("k_proj.bias"), "{name}: a gradient of 0 where the model depends on it");
    }
    assert_eq!(noise.iter().filter(|n| **n).count(), 2 * EXPERTS.len(), "both layers' k_proj.bias, every expert");
    let update = |v: &[f32]| v.iter().zip(&noise).map(|(x, &n)| if n { 0.0 } else { x - 0.3 }).collect::<Vec<f32>>();
    let (du, dw) = (update(&got), update(&want));
    let diff = du.iter().zip(&dw).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let norm = dw.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    assert!(norm > 1e-3, "the fixture's coefficients moved ({norm:.3e})");
    assert!(diff / norm <= UPDATE_REL_L2_TOL, "the 5 steps' update is off by {:.3e} (relative L2)", diff / norm);

    // The merged model is FusionBench's merge_and_unload, tensor by tensor
    let ours = ModelDir::open(&out).unwrap();
    let want = TensorStore::open_file(&fixture("adamerging/expected.safetensors")).unwrap();
    let mut checked = 0;
    // (But for the key biases, whose coefficients are noise, as above.)
    for name in want.names().filter_map(|n| n.strip_prefix("merged.")).filter(|n| !n.ends_with("k_proj.bias")) {
        let g = ours.store.get_any(name).unwrap().host().unwrap().to_vec();
        let w = want.get_any(&format!("merged.{name}")).unwrap().host().unwrap().to_vec();
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{name}: off by {worst:.3e}");
        checked += 1;
    }
    assert_eq!(checked, 39 - 2);

    let (ok, text, err) = engine(&["info", s(&out), "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want = serde_json::json!({
        "tool": format!("wemoe-engine {}", env!("CARGO_PKG_VERSION")),
        "method": "adamerging",
        "experts": EXPERTS,
        "scaling": 0.3,
        "steps": 5,
        "lr": 1e-3,
        "batch_size": 16,
        "seed": 0,
        "clamp_weights": false,
        "granularity": "layer-wise",
        "tasks": ["left", "right"],
    });
    assert_eq!(info["merge"], want);
    // Each expert's trained coefficients, summarised from the file beside the model.
    assert_eq!(info["coefficients"]["granularity"], "layer-wise");
    for (t, expert) in EXPERTS.iter().enumerate() {
        let row = &got[t * names.len()..(t + 1) * names.len()];
        let summary = &info["coefficients"]["experts"][t];
        assert_eq!(summary["name"], *expert, "the experts in order");
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64;
        assert!((summary["mean"].as_f64().unwrap() - mean).abs() < 1e-12, "{expert}: {summary}");
        let lowest = row.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(summary["min"].as_f64().unwrap() as f32, lowest, "{expert}: the same f32, as its shortest decimal");
    }
    let (ok, text, err) = engine(&["info", s(&out)]);
    assert!(ok, "{err}");
    let line = "merged      adamerging of red, green, blue (scaling 0.3, steps 5, lr 0.001, batch_size 16, seed 0, \
                granularity layer-wise, clamp_weights false) on left, right by wemoe-engine";
    assert!(text.contains(line), "{text}");
}

#[test]
fn bad_adamerging_arguments_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adamerged");
    let heads = fixture("adapt/heads.safetensors");
    let left = format!("left={}", s(&fixture("adapt/left.safetensors")));
    let empty = tmp.path().join("empty.safetensors");
    wemoe_engine::output::write_safetensors(
        &empty,
        &[wemoe_engine::output::NamedTensor { name: "pixel_values".into(), shape: vec![0, 3, 24, 24], values: vec![] }],
    )
    .unwrap();
    let without = |flag: &str, values: usize| {
        let args = command(&out, &["--steps", "1"]);
        let mut kept = Vec::new();
        let mut skip = 0;
        for a in args {
            if skip > 0 {
                skip -= 1;
            } else if a == flag {
                skip = values;
            } else {
                kept.push(a);
            }
        }
        kept
    };
    let with_method = |method: &str, extra: &[&str]| {
        let mut args = command(&out, extra);
        let at = args.iter().position(|a| a == "adamerging").unwrap();
        args[at] = method.into();
        args
    };
    // A data-free merge's arguments, with `extra`.
    let data_free = |method: &str, extra: &[&str]| {
        let mut args: Vec<String> = vec!["merge".into(), "--method".into(), method.into(), "--pretrained".into()];
        args.push(s(&fixture("wemoe/pretrained")).into());
        args.extend(["--expert".to_string(), format!("red={}", s(&fixture("wemoe/red")))]);
        args.extend(["--out".to_string(), s(&out).into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let other_task = {
        let mut args = without("--task", 1);
        args.extend(["--task".to_string(), format!("centre={}", s(&fixture("adapt/left.safetensors")))]);
        args
    };
    let empty_task = {
        let mut args = without("--task", 1);
        args.extend(["--task".to_string(), format!("left={}", s(&empty))]);
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (without("--heads", 1), "--method adamerging needs --heads"),
        (without("--task", 1), "--method adamerging needs at least one --task"),
        (with_method("task-arithmetic", &[]), "--heads applies to --method adamerging only"),
        (
            {
                let mut a = with_method("wemoe", &[]);
                a.retain(|x| x != "--heads" && x != s(&heads));
                a
            },
            "--task applies to --method adamerging only",
        ),
        (data_free("average", &["--checkpoint-every", "5"]), "--checkpoint-every applies to --method adamerging only"),
        (data_free("ties-merging", &["--resume"]), "--resume applies to --method adamerging only"),
        (data_free("wemoe", &["--steps", "5"]), "--steps applies to --method adamerging only"),
        (data_free("average", &["--clamp-weights"]), "--clamp-weights applies to --method adamerging only"),
        (data_free("wemoe", &["--granularity", "task-wise"]), "--granularity applies to --method adamerging only"),
        (command(&out, &["--steps", "0"]), "--steps must be positive"),
        (command(&out, &["--checkpoint-every", "0"]), "--checkpoint-every must be positive"),
        (command(&out, &["--lr", "-1"]), "--lr must be a positive number"),
        (command(&out, &["--batch-size", "0"]), "--batch-size must be positive"),
        (command(&out, &["--steps", "1", "--task", &left]), "--task 'left' is given twice"),
        (other_task, "no head for task 'centre'"),
        (empty_task, "holds no images"),
    ];
    for (args, message) in cases {
        let (ok, _, err) = run(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(message), "{message}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{message}: {err}");
        assert!(!out.exists(), "{message}: left {}", out.display());
    }
    // An --out that holds anything else is refused before any step runs; an empty one (made ahead, or left by a
    // run killed before its first checkpoint) is taken as new, also by --resume.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = run(&command(&out, &["--steps", "1"]));
    assert!(!ok && err.contains("already exists"), "{err}");
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    let (ok, _, err) = run(&command(&out, &["--steps", "1", "--resume"]));
    assert!(ok && out.join("model.safetensors").exists(), "{err}");
}

/// The step a checkpoint holds.
fn checkpoint_step(out: &Path) -> Option<u64> {
    let file = SafetensorsFile::open(&out.join(ADAMERGING_CHECKPOINT)).ok()?;
    let state: serde_json::Value = serde_json::from_str(file.metadata("state")?).ok()?;
    state["step"].as_u64()
}

#[test]
fn resume_after_sigkill_ends_byte_identical_to_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    // Batches of 3 of each task's 4 images: the streams' state matters across the kill.
    let steps = "1500";
    let whole = tmp.path().join("whole");
    // --resume with no --out yet starts at step 0, as a run without it does, and says so.
    let (ok, _, err) = run(&command(&whole, &["--steps", steps, "--batch-size", "3", "--resume"]));
    assert!(ok, "{err}");
    let fresh = format!("note: --resume: {} does not exist yet", s(&whole.join("adamerging-checkpoint.safetensors")));
    assert!(err.contains(&fresh), "{err}");
    let killed = tmp.path().join("killed");
    let args = command(&killed, &["--steps", steps, "--batch-size", "3", "--checkpoint-every", "7"]);
    let (at, _) = signal_after_checkpoint(&args, || checkpoint_step(&killed), 14, "KILL");
    assert!(at < 1500, "the run finished before it could be killed (checkpoint at {at})");
    assert!(!killed.join("model.safetensors").exists());

    // Without --resume, or with other arguments, the checkpoint is refused and kept.
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("holds a checkpoint; pass --resume"), "{err}");
    let mut other = command(&killed, &["--steps", steps, "--batch-size", "3", "--lr", "2e-3", "--resume"]);
    let (ok, _, err) = run(&other);
    assert!(!ok && err.contains("was made with other arguments (lr: 0.001 there, 0.002 now)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    other = command(&killed, &["--steps", steps, "--batch-size", "3", "--seed", "1", "--resume"]);
    let (ok, _, err) = run(&other);
    assert!(!ok && err.contains("(seed: 0 there, 1 now)"), "{err}");
    other = command(&killed, &["--steps", steps, "--batch-size", "3", "--granularity", "task-wise", "--resume"]);
    let (ok, _, err) = run(&other);
    assert!(!ok && err.contains("(granularity: \"layer-wise\" there, \"task-wise\" now)"), "{err}");
    // Resumed to fewer steps than the checkpoint holds: refused, not a model of `at` steps recorded as fewer.
    let fewer = (at - 1).to_string();
    let (ok, _, err) = run(&command(&killed, &["--steps", &fewer, "--batch-size", "3", "--resume"]));
    let past = format!("is at step {at}, past --steps {fewer}; resume with --steps {at} or more");
    assert!(!ok && err.contains(&past) && err.trim().lines().count() == 1, "{err}");
    assert!(!killed.join("model.safetensors").exists());
    assert_eq!(checkpoint_step(&killed), Some(at), "a refused resume leaves the checkpoint as it was");

    let mut resumed = args.clone();
    resumed.push("--resume".into());
    let (ok, _, err) = run(&resumed);
    assert!(ok, "{err}");
    for file in ["model.safetensors", COEFFICIENTS_FILE] {
        let read = |p: &PathBuf| std::fs::read(p.join(file)).unwrap();
        assert!(read(&whole) == read(&killed), "resumed from step {at}: {file} differs");
    }
}

#[test]
fn a_loss_that_turns_non_finite_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adamerged");
    // A rate of 1e30 sends the coefficients, then the weights, past f32's range at the second step.
    let (ok, _, err) = run(&command(&out, &["--steps", "3", "--lr", "1e30", "--checkpoint-every", "1"]));
    assert!(!ok);
    assert!(err.contains("the loss turned non-finite at step 2"), "{err}");
    assert!(err.contains("the last good checkpoint is kept in"), "{err}");
    assert_eq!(checkpoint_step(&out), Some(1));
    assert!(!out.join("model.safetensors").exists());
    // Before any checkpoint, nothing is left.
    let fresh = tmp.path().join("fresh");
    let (ok, _, err) = run(&command(&fresh, &["--steps", "3", "--lr", "1e30"]));
    assert!(!ok && err.contains("no checkpoint was written yet"), "{err}");
    assert!(!fresh.exists(), "a run that failed before its first checkpoint left {}", fresh.display());
    // A folder made ahead stays, as empty as it was.
    let ahead = tmp.path().join("ahead");
    std::fs::create_dir(&ahead).unwrap();
    let (ok, _, err) = run(&command(&ahead, &["--steps", "3", "--lr", "1e30"]));
    assert!(!ok && err.contains("no checkpoint was written yet"), "{err}");
    assert!(std::fs::read_dir(&ahead).unwrap().next().is_none(), "a failed run left files in {}", ahead.display());
}

#[test]
fn info_prints_the_command_that_continues_an_adamerging_run() {
    // As for adapt (tests/adapt_cli.rs): the command `info` prints for a run whose model is not written continues
    // it, with every argument its checkpoint needs (task-wise, clamped, another initial value).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("my run");
    let extra = ["--steps", "2", "--checkpoint-every", "1", "--granularity", "task-wise", "--clamp-weights"];
    let (ok, _, err) = run(&command(&out, &[&extra[..], &["--scaling", "0.25", "--quiet"]].concat()));
    assert!(ok, "{err}");
    let coefficients = std::fs::read(out.join(COEFFICIENTS_FILE)).unwrap();
    for file in ["model.safetensors", "config.json", COEFFICIENTS_FILE] {
        std::fs::remove_file(out.join(file)).unwrap();
    }
    let (ok, text, err) = engine(&["info", s(&out)]);
    assert!(
        ok && text.contains("run         AdaMerging, step 2 of 2 (every step done: the command below writes the model"),
        "{text}{err}"
    );
    let err = run_the_resume_command_info_prints(&out);
    assert!(err.contains("every step from its checkpoint"), "{err}");
    assert!(std::fs::read(out.join(COEFFICIENTS_FILE)).unwrap() == coefficients, "the coefficients differ");
}
