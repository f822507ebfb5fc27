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
    let json = tmp.path().join("demo.json");
    let work = tmp.path().join("models");
    let args = ["demo", "--steps", "4", "--curve-points", "2", "--json", s(&json), "--work", s(&work), "--quiet"];
    let (ok, out, err) = engine(&args);
    assert!(ok, "{out}{err}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
    let work = tmp.path().join("kept");
    std::fs::create_dir(&work).unwrap();
    let (ok, _, err) = engine(&["demo", "--work", s(&work)]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let json = tmp.path().join("no-such-folder").join("demo.json");
    let (ok, _, err) = engine(&["demo", "--json", s(&json)]);
    assert!(!ok && err.contains("no-such-folder") && err.contains("does not exist"), "{err}");
}
