//! TIES-merging against FusionBench's `TiesMergingAlgorithm` (fixtures of tools/make_ties_fixtures.py): its
//! default settings on experts with continuous task vectors; every merge function on a grid of exact values,
//! where many magnitudes equal the threshold and trimmed entries cancel; and the command line.

mod common;

use std::path::Path;

use common::*;
use wemoe_engine::checkpoint::{ModelDir, TensorStore};
use wemoe_engine::merge::{merge, Expert, MergeMethod, MergeOptions, MergeSummary, TiesMergeFunc, TiesOptions};
use wemoe_engine::model::RouterActivation;

const EXPERTS: [&str; 3] = ["red", "green", "blue"];

/// Merges `dir`/pretrained with `dir`'s experts by TIES into `out`.
fn ties(dir: &Path, ties: TiesOptions, out: &Path) -> MergeSummary {
    let pretrained = ModelDir::open(&dir.join("pretrained")).unwrap();
    let experts: Vec<Expert> =
        EXPERTS.iter().map(|n| Expert { name: n.to_string(), model: ModelDir::open(&dir.join(n)).unwrap() }).collect();
    let options = MergeOptions {
        method: MergeMethod::TiesMerging(ties),
        scaling: 0.3,
        router_layers: 2,
        router_activation: RouterActivation::Identity,
        seed: 0,
    };
    merge(&pretrained, &experts, &options, out, &mut |_, _| {}).unwrap()
}

/// The largest difference, relative to 1 + |FusionBench's value|, over every tensor of FusionBench's merge
/// `expected` (a state dict, read under HF's prefixed names), and the count of elements whose bits differ
/// (0.0 against −0.0 included), after checking that the merged model has exactly its tensors.
fn differences(out: &Path, expected: &str) -> (f64, usize) {
    let ours = ModelDir::open(out).unwrap();
    let want = TensorStore::open_file(&fixture(expected)).unwrap();
    let mut names: Vec<&str> = ours.store.names().collect();
    names.sort();
    let mut want_names: Vec<String> = want.names().map(str::to_string).collect();
    want_names.sort();
    assert_eq!(names, want_names, "{expected}: tensor names");
    let (mut largest, mut bits) = (0.0f64, 0);
    for name in names {
        let got = ours.store.get_any(name).unwrap().host().unwrap().to_vec();
        let w = want.get_any(name).unwrap().host().unwrap().to_vec();
        assert_eq!(got.len(), w.len(), "{name}");
        for (g, w) in got.iter().zip(&w) {
            largest = largest.max((*g as f64 - *w as f64).abs() / (1.0 + (*w as f64).abs()));
            bits += usize::from(g.to_bits() != w.to_bits());
        }
    }
    (largest, bits)
}

#[test]
fn default_settings_merge_as_fusionbench_does() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ties");
    let summary = ties(&fixture("wemoe"), TiesOptions::default(), &out);
    let stats = summary.ties.expect("TIES statistics");
    assert_eq!(stats.keep, 0.2);
    assert!(stats.thresholds.iter().all(|t| *t > 0.0), "{:?}", stats.thresholds);
    let (diff, bits) = differences(&out, "ties/expected_default.safetensors");
    println!("largest difference from FusionBench's merge: {diff:.3e}; elements of other bits: {bits}");
    assert!(diff <= MERGE_TOL, "{diff:e}");
}

/// On the grid every sum is exact, so the merge must give FusionBench's bits, the sign of a zero included
/// (the grid's pretrained weights hold −0.0): the trim keeps every magnitude
/// equal to the threshold, a cancelling parameter takes the majority sign, each function combines as it does.
#[test]
fn every_merge_function_on_exact_values_gives_fusionbenchs_bits() {
    let tmp = tempfile::tempdir().unwrap();
    for (threshold, merge_func, file) in [
        (20.0, TiesMergeFunc::Sum, "grid_sum_20"),
        (20.0, TiesMergeFunc::Mean, "grid_mean_20"),
        (20.0, TiesMergeFunc::Max, "grid_max_20"),
        (0.6, TiesMergeFunc::Sum, "grid_sum_0.6"),
    ] {
        let out = tmp.path().join(file);
        ties(&fixture("ties/grid"), TiesOptions { threshold, merge_func }, &out);
        assert_eq!(differences(&out, &format!("ties/{file}.safetensors")), (0.0, 0), "{file}");
    }
    // Keeping everything (threshold 100, where FusionBench's kthvalue(0) fails) is the general path with the
    // least magnitude as the threshold (K just below 1 leaves k = 1).
    let all = tmp.path().join("all");
    let summary = ties(&fixture("ties/grid"), TiesOptions { threshold: 100.0, merge_func: TiesMergeFunc::Sum }, &all);
    assert_eq!(summary.ties.unwrap().thresholds, [0.0; 3]);
    let least = tmp.path().join("least");
    let summary =
        ties(&fixture("ties/grid"), TiesOptions { threshold: 0.9999999, merge_func: TiesMergeFunc::Sum }, &least);
    assert_eq!(summary.ties.unwrap().thresholds, [0.0; 3], "the grid's least magnitude is 0");
    let (a, b) = (ModelDir::open(&all).unwrap(), ModelDir::open(&least).unwrap());
    for name in a.store.names() {
        assert_eq!(a.store.get_any(name).unwrap().host().unwrap(), b.store.get_any(name).unwrap().host().unwrap());
    }
}

#[test]
fn ties_merging_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = fixture("ties/grid");
    let out = tmp.path().join("merged");
    let mut args = vec!["merge".to_string(), "--pretrained".into(), s(&grid.join("pretrained")).into()];
    for n in EXPERTS {
        args.extend(["--expert".to_string(), format!("{n}={}", s(&grid.join(n)))]);
    }
    args.extend(["--out".to_string(), s(&out).into()]);
    let run = |extra: &[&str]| {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(extra);
        engine(&all)
    };
    let (ok, _, err) = run(&["--method", "ties-merging", "--threshold", "0.6", "--merge-func", "sum"]);
    assert!(ok, "{err}");
    assert!(err.contains("the top 60%") && err.contains("red ") && err.contains("blue "), "{err}");
    assert_eq!(differences(&out, "ties/grid_sum_0.6.safetensors"), (0.0, 0));
    // config.json records how the model was made, and info says it.
    let (ok, text, err) = engine(&["info", s(&out), "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want = serde_json::json!({
        "tool": format!("wemoe-engine {}", env!("CARGO_PKG_VERSION")),
        "method": "ties-merging",
        "experts": EXPERTS,
        "scaling": 0.3,
        "threshold": 0.6,
        "merge_func": "sum",
    });
    assert_eq!(info["merge"], want);
    let (ok, text, err) = engine(&["info", s(&out)]);
    assert!(ok, "{err}");
    let line =
        "merged      ties-merging of red, green, blue (scaling 0.3, threshold 0.6, merge_func sum) by wemoe-engine";
    assert!(text.contains(line), "{text}");
    std::fs::remove_dir_all(&out).unwrap();

    for (extra, message) in [
        (&["--method", "ties-merging", "--threshold", "0"][..], "--threshold 0: must be a share of entries kept"),
        (&["--method", "ties-merging", "--threshold", "150"][..], "--threshold 150: must be a share"),
        (&["--method", "ties-merging", "--threshold", "-20"][..], "--threshold -20: must be a share"),
        (&["--method", "wemoe", "--threshold", "20"][..], "--threshold applies to --method ties-merging only"),
        (&["--method", "task-arithmetic", "--merge-func", "max"][..], "--merge-func applies to --method ties-merging"),
    ] {
        let (ok, _, err) = run(extra);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(message), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    }
    // The command-line contract's settings are accepted with every method (other tools pass them all); one a
    // method does not use gets a note.
    for (extra, note) in [
        (
            &["--method", "ties-merging", "--router-layers", "1"][..],
            "--router-layers has no effect with --method ties-merging",
        ),
        (&["--method", "task-arithmetic", "--router-activation", "softmax"][..], "--router-activation has no effect"),
        (&["--method", "ties-merging", "--seed", "3"][..], "note: --seed has no effect with --method ties-merging"),
        (&["--method", "average", "--scaling", "0.5"][..], "note: --scaling has no effect with --method average"),
    ] {
        let (ok, _, err) = run(extra);
        assert!(ok && err.contains(note), "{extra:?}: {err}");
        std::fs::remove_dir_all(&out).unwrap();
    }
    let (ok, _, err) = run(&["--method", "wemoe", "--router-layers", "1", "--seed", "3", "--scaling", "0.5"]);
    assert!(ok && !err.contains("note:"), "each used by wemoe: {err}");
}
