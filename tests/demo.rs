//! `wemoe-engine demo` on the bundled suite (assets/suite), with a short adaptation: every method of the
//! table, the engine's accuracies of the pretrained model and of each expert equal to the suite builder's own
//! PyTorch evaluation (suite.json), and the curve's points.

mod common;

use common::*;
use serde_json::Value;
use wemoe_engine::suite::Suite;

/// One test image in either direction: the engine and PyTorch may disagree on an image whose two best
/// logits tie within float rounding.
const ONE_IMAGE: f64 = 1.0 / 500.0 + 1e-9;

#[test]
fn demo_runs_on_the_bundled_suite_and_agrees_with_pytorch() {
    let suite = Suite::open(&Suite::bundled_path()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Made ahead: an empty folder is taken as a new one.
    let work = tmp.path().join("models");
    std::fs::create_dir(&work).unwrap();
    // `--json -`: the JSON alone on stdout, the table on stderr (with --quiet, nothing else), no file named '-'.
    let args = ["demo", "--steps", "4", "--curve-points", "2", "--json", "-", "--work", s(&work), "--quiet"];
    let run = engine_command().args(args).current_dir(tmp.path()).output().unwrap();
    let (json, out) = (String::from_utf8(run.stdout).unwrap(), String::from_utf8(run.stderr).unwrap());
    assert!(run.status.success(), "{json}{out}");
    assert!(!tmp.path().join("-").exists());
    let report: Value = serde_json::from_str(&json).unwrap();
    let names = suite.task_names();
    let methods = [
        "pretrained",
        "individual",
        "weight-averaging",
        "task-arithmetic",
        "ties-merging",
        "adamerging",
        "wemoe-unadapted",
        "wemoe",
        "wemoe-oracle",
    ];
    assert_eq!(report["methods"].as_object().unwrap().len(), methods.len());
    for method in methods {
        let row = &report["methods"][method];
        let accuracies: Vec<f64> = names.iter().map(|n| row["tasks"][n].as_f64().unwrap()).collect();
        assert!(accuracies.iter().all(|a| (0.0..=1.0).contains(a)), "{method}: {accuracies:?}");
        let mean = accuracies.iter().sum::<f64>() / accuracies.len() as f64;
        assert!((row["average"].as_f64().unwrap() - mean).abs() < 1e-12, "{method}: average");
        let line = out.lines().find(|l| l.split_whitespace().next() == Some(method)).unwrap_or_else(|| panic!("{out}"));
        assert!(line.ends_with(&format!("{:.1}", 100.0 * mean)), "{line}");
    }
    // The builder evaluated the pretrained model and the experts with transformers on the same test splits.
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(suite.root.join("suite.json")).unwrap()).unwrap();
    for method in ["pretrained", "individual"] {
        for n in &names {
            let ours = report["methods"][method]["tasks"][n].as_f64().unwrap();
            let torch = manifest["builder_accuracy"][method][n].as_f64().unwrap();
            assert!((ours - torch).abs() <= ONE_IMAGE, "{method} on {n}: {ours} here, {torch} in PyTorch");
        }
    }
    // Routing fixed to each task's own expert recovers the expert: the experts moved little outside the MLPs.
    let (oracle, individual) = (
        report["methods"]["wemoe-oracle"]["average"].as_f64().unwrap(),
        report["methods"]["individual"]["average"].as_f64().unwrap(),
    );
    assert!((oracle - individual).abs() < 0.05, "oracle {oracle}, individual {individual}");
    // The merged and adapted models were kept in --work; the curve starts at the unadapted model.
    assert!(work.join("wemoe-adapted").join("model.safetensors").exists());
    assert!(work.join("adamerging").join("model.safetensors").exists());
    assert_eq!(report["adamerging"]["steps"], 4);
    let curve = report["adaptation"]["curve"].as_array().unwrap();
    let steps: Vec<u64> = curve.iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 2, 4]);
    assert_eq!(curve[0]["average"], report["methods"]["wemoe-unadapted"]["average"]);
    assert_eq!(curve[2]["average"], report["methods"]["wemoe"]["average"]);
}

#[test]
fn demo_names_a_missing_suite_and_bad_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = engine(&["demo", "--suite", s(tmp.path())]);
    assert!(!ok && err.contains("suite.json") && err.contains("tools/build_suite.py"), "{err}");
    // A --work that holds anything is refused before the device opens, so in one line (an empty one is taken: the
    // demo above runs in one made ahead).
    let work = tmp.path().join("kept");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = engine(&["demo", "--work", s(&work)]);
    let want = format!("error: {}: already exists; --work needs a new or empty folder", s(&work));
    assert!(!ok && err.trim_end() == want, "{err}");
    // A new --work in a missing folder is refused, not made with it (a failed demo left the missing folder).
    let nested = tmp.path().join("no-such-folder").join("work");
    let (ok, _, err) = engine(&["demo", "--work", s(&nested)]);
    let want = format!("error: {}: the parent directory of --work does not exist", s(&nested));
    assert!(!ok && err.trim_end() == want && !nested.parent().unwrap().exists(), "{err}");
    // Without --work, the scratch folder in a TMPDIR that does not exist: named, with where it goes and the way
    // round (the error named the folder alone).
    let (ok, _, err) =
        engine_with_env(&[("TMPDIR", s(&tmp.path().join("no-such-tmp")))], &["demo", "--device", "cpu", "--quiet"]);
    let want = "cannot create (the demo's scratch folder, in TMPDIR or /tmp; or give --work)";
    assert!(!ok && err.contains("no-such-tmp") && err.contains(want), "{err}");
    let json = tmp.path().join("no-such-folder").join("demo.json");
    let (ok, _, err) = engine(&["demo", "--json", s(&json)]);
    assert!(!ok && err.contains("no-such-folder") && err.contains("does not exist"), "{err}");
    // Settings the adaptation would refuse are refused before the first model is evaluated.
    for (args, want) in [
        (["--steps", "0"], "--steps must be positive"),
        (["--lr", "-1"], "--lr must be a positive number, got -1"),
        (["--lr", "nan"], "--lr must be a positive number, got NaN"),
    ] {
        let (ok, out, err) = engine(&[&["demo", "--device", "cpu"][..], &args].concat());
        assert!(!ok && out.is_empty() && err.trim_end() == format!("error: {want}"), "{args:?}: {out}{err}");
    }
    // A --json onto one of the suite's files is refused before any work (the suite here is a copy).
    let suite = tmp.path().join("suite");
    copy_folder(&wemoe_engine::suite::Suite::bundled_path(), &suite);
    for file in ["heads.safetensors", "experts/mnist/config.json"] {
        let json = suite.join(file);
        let before = std::fs::read(&json).unwrap();
        let (ok, out, err) = engine(&["demo", "--suite", s(&suite), "--json", s(&json)]);
        let want = format!("--json {}: would replace {}, one of this command's inputs", s(&json), s(&json));
        assert!(!ok && out.is_empty() && err.starts_with(&format!("error: {want}")), "{out}{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert_eq!(std::fs::read(&json).unwrap(), before);
    }
    // An expert that fails to load once the demo has begun: the --work folder the demo made, still empty, goes
    // (it used to stay behind).
    let work = tmp.path().join("work");
    let mnist = suite.join("experts/mnist/model.safetensors");
    poison_first_value(&mnist);
    let (ok, _, err) = engine(&["demo", "--suite", s(&suite), "--work", s(&work), "--device", "cpu", "--quiet"]);
    assert!(!ok && err.contains("holds a non-finite value (NaN at element 0)"), "{err}");
    assert!(!work.exists(), "{err}");
    // A damaged expert file is found with the other inputs: before the device opens and --work is made.
    std::fs::OpenOptions::new().write(true).open(&mnist).unwrap().set_len(1000).unwrap();
    let (ok, _, err) = engine(&["demo", "--suite", s(&suite), "--work", s(&work)]);
    assert!(!ok && err.starts_with(&format!("error: {}: ", s(&mnist))) && err.lines().count() == 1, "{err}");
    assert!(!work.exists(), "{err}");
}

/// Makes the first element of the first tensor (in file order) of a safetensors file of f32 tensors a NaN.
fn poison_first_value(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let first = header.as_object().unwrap().iter().filter(|(k, _)| *k != "__metadata__");
    let (name, info) = first.min_by_key(|(_, i)| i["data_offsets"][0].as_u64().unwrap()).unwrap();
    assert_eq!(info["dtype"], "F32", "{name}");
    let at = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[cfg(unix)]
#[test]
fn an_interrupted_demo_removes_a_work_folder_it_made_until_it_holds_a_model() {
    // A --work folder the demo made holds nothing of the user's until its first model: Ctrl-C before then removes
    // it and says so (it used to stay behind, empty); once a model is there, the folder and the model stay.
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let args = ["demo", "--steps", "100000", "--device", "cpu", "--quiet", "--work", s(&work)];
    let out = signal_when(&args, || work.exists(), "INT", "the --work folder");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains(&format!("interrupted by SIGINT; removed the partial output {}", s(&work))), "{err}");
    assert!(!work.exists(), "{err}");
    // Signalled once the second model is in place, the first being kept by then.
    let (first, second) = (work.join("weight-averaging"), work.join("task-arithmetic"));
    let out = signal_when(&args, || second.join("model.safetensors").exists(), "INT", "the second model");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(first.join("model.safetensors").exists() && first.join("config.json").exists());
}

fn copy_folder(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        match path.is_dir() {
            true => copy_folder(&path, &to.join(entry.file_name())),
            false => drop(std::fs::copy(&path, to.join(entry.file_name())).unwrap()),
        }
    }
}

#[test]
fn an_interrupted_demo_removes_its_models_and_says_so() {
    // The demo's models go to a scratch folder under the temporary folder. Ctrl-C (SIGINT) while it writes
    // them must remove the folder, name it, and end with the status a shell gives a process SIGINT ended.
    let tmp = tempfile::tempdir().unwrap();
    let mut child = engine_command()
        .args(["demo", "--steps", "100000", "--device", "cpu", "--quiet"])
        .env("TMPDIR", tmp.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let scratch = tmp.path().join(format!("wemoe-demo-{}", child.id()));
    let has_a_model = || {
        std::fs::read_dir(&scratch)
            .is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| e.path().join("model.safetensors").exists())))
    };
    let start = std::time::Instant::now();
    while !has_a_model() {
        assert!(start.elapsed().as_secs() < 300, "no model appeared in {}", scratch.display());
        assert!(child.try_wait().unwrap().is_none(), "the demo ended before it was interrupted");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains(&format!("interrupted by SIGINT; removed the partial output {}", scratch.display())), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
