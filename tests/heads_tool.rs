//! Heads written by tools/make_heads.py (fixtures of tools/make_heads_fixtures.py): through the engine they give
//! FusionBench's `HFCLIPClassifier` logits, and each data task's rows follow the engine's label ids; the class
//! names they carry let `eval` match a dataset's labels to a head's rows by name.

mod common;

use common::*;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::CpuBackend;
use wemoe_engine::eval::{Batching, Encoder, Evaluator, HeadRows};
use wemoe_engine::model::{Heads, ImageEncoder, Routing};
use wemoe_engine::output::{write_safetensors_with_metadata, NamedTensor};
use wemoe_engine::tensor::Tensor;

#[test]
fn heads_from_make_heads_give_fusionbench_logits() {
    let be = CpuBackend::new();
    let dir = ModelDir::open(&fixture("heads_tool/clip")).unwrap();
    let model = ImageEncoder::load(&be, &dir).unwrap();
    let (shape, pixels) = reference("heads_tool/expected.safetensors", "pixel_values");
    let out = model.encode(&be, &Tensor::from_vec(&shape, pixels).unwrap(), Routing::Sample).unwrap();
    let heads = Heads::open(&be, &fixture("heads_tool/heads.safetensors")).unwrap();
    let classifier = heads.classifier(&model, &dir.path).unwrap();
    let mut tasks: Vec<&str> = heads.task_names().collect();
    tasks.sort_unstable();
    assert_eq!(tasks, ["mnist", "pets", "photos"]);
    for task in tasks {
        let logits = classifier.logits(&be, &out.pooled, heads.head(task).unwrap()).unwrap();
        let (want_shape, want) = reference("heads_tool/expected.safetensors", &format!("logits.{task}"));
        assert_eq!(logits.shape(), want_shape.as_slice(), "{task}");
        assert_close(&format!("logits {task}"), logits.host().unwrap(), &want);
    }
}

#[test]
fn a_data_tasks_head_rows_follow_the_engines_class_ids() {
    let file = SafetensorsFile::open(&fixture("heads_tool/heads.safetensors")).unwrap();
    let classes: serde_json::Value = serde_json::from_str(file.metadata("classes").unwrap()).unwrap();
    let pre = Preprocess::clip(32);
    for (task, data) in [("photos", "photos"), ("pets", "parquet/two_shards")] {
        let dataset = Dataset::open(&fixture(data), &pre, 32).unwrap();
        let engine: Vec<&str> = dataset.classes().unwrap().iter().map(String::as_str).collect();
        let tool: Vec<&str> = classes[task].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(tool, engine, "{task}: the heads' class order against the engine's label ids");
    }
}

/// Correct predictions on `task`'s `data` through `heads` with the heads_tool model.
fn correct(heads: &std::path::Path, task: &str, data: &Dataset) -> usize {
    let be = CpuBackend::new();
    let dir = ModelDir::open(&fixture("heads_tool/clip")).unwrap();
    let model = ImageEncoder::load(&be, &dir).unwrap();
    let heads = Heads::open(&be, heads).unwrap();
    let evaluator = Evaluator::new(&be, Encoder::Resident(&model), &heads, &dir.path).unwrap();
    let batching = Batching { size: 3, routing: Routing::Sample };
    evaluator.task(task, data, batching, &mut |_| {}).unwrap().correct
}

/// The tool's heads file with `task`'s rows (and, with `names`, its class names) in reverse order.
fn reversed_head(out: &std::path::Path, task: &str, names: bool) {
    let file = SafetensorsFile::open(&fixture("heads_tool/heads.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let t = file.f32(name).unwrap();
        let mut values = t.host().unwrap().to_vec();
        if name == format!("head.{task}") {
            let width = t.shape()[1];
            values = values.chunks(width).rev().flatten().copied().collect();
        }
        tensors.push(NamedTensor { name: name.to_string(), shape: t.shape().to_vec(), values });
    }
    let mut classes: serde_json::Value = serde_json::from_str(file.metadata("classes").unwrap()).unwrap();
    classes[task].as_array_mut().unwrap().reverse();
    let metadata = if names { [("classes".to_string(), classes.to_string())].into() } else { Default::default() };
    write_safetensors_with_metadata(out, &tensors, metadata).unwrap();
}

#[test]
fn labels_meet_head_rows_by_class_name_when_the_heads_name_them() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = ModelDir::open(&fixture("heads_tool/clip")).unwrap();
    let side = dir.config.image_size;
    let pre = Preprocess::for_model(&dir.path, side).unwrap();
    let tool = fixture("heads_tool/heads.safetensors");
    // A head in another order: the same score when it names its rows. (The photos score 2 of 4 either way
    // with this model; the parquet's three classes show the difference.)
    let pets = Dataset::open(&fixture("parquet/two_shards"), &pre, side).unwrap();
    let named = scratch.path().join("named.safetensors");
    let unnamed = scratch.path().join("unnamed.safetensors");
    reversed_head(&named, "pets", true);
    reversed_head(&unnamed, "pets", false);
    let want = correct(&tool, "pets", &pets);
    assert_eq!(correct(&named, "pets", &pets), want, "a reversed head that names its rows");
    assert_ne!(correct(&unnamed, "pets", &pets), want, "a reversed head without names scores differently");

    // A subset of the classes: an ImageFolder with one class folder, `fish` (id 0, the pets head's row 2).
    let subset = scratch.path().join("subset");
    std::fs::create_dir_all(subset.join("fish")).unwrap();
    for class in ["class_0", "class_1"] {
        for f in std::fs::read_dir(fixture("photos").join(class)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, subset.join("fish").join(f.file_name().unwrap())).unwrap();
        }
    }
    let subset = Dataset::open(&subset, &pre, side).unwrap();
    let be = CpuBackend::new();
    let heads = Heads::open(&be, &tool).unwrap();
    assert_eq!(HeadRows::for_task(&heads, "pets", &subset), HeadRows::ByName(vec![2]));
    assert_eq!(HeadRows::for_task(&heads, "pets", &pets), HeadRows::ByName(vec![0, 1, 2]));
    assert_eq!(HeadRows::for_task(&heads, "mnist", &pets), HeadRows::Ids, "names that are not the head's");
    let model = ImageEncoder::load(&be, &dir).unwrap();
    let out = model.encode(&be, &subset.batch(0..subset.len()).unwrap(), Routing::Sample).unwrap();
    let logits = heads.classifier(&model, &dir.path).unwrap().logits(&be, &out.pooled, heads.head("pets").unwrap());
    let logits = logits.unwrap().host().unwrap().to_vec();
    let predicted = |row: usize| logits.chunks(3).filter(|l| (0..3).all(|r| r == row || l[row] > l[r])).count();
    assert_ne!(predicted(2), predicted(0), "with this model the subset tells row 2 from row 0");
    assert_eq!(correct(&tool, "pets", &subset), predicted(2));
}

#[test]
fn eval_says_when_it_matches_classes_by_name() {
    let scratch = tempfile::tempdir().unwrap();
    let fish = scratch.path().join("fish");
    std::fs::create_dir_all(&fish).unwrap();
    std::fs::copy(fixture("photos/class_1/china_61x47.jpg"), fish.join("a.jpg")).unwrap();
    let eval = |data: &std::path::Path| {
        engine(&[
            "eval",
            "--model",
            s(&fixture("heads_tool/clip")),
            "--heads",
            s(&fixture("heads_tool/heads.safetensors")),
            "--task",
            &format!("pets={}", s(data)),
            "--device",
            "cpu",
        ])
    };
    let (ok, _, err) = eval(scratch.path());
    assert!(ok && err.contains("classes are matched to the rows of head 'pets' by name"), "{err}");
    assert!(!err.contains("taken as the head's class indices"), "{err}");
    let (ok, _, err) = eval(&fixture("parquet/two_shards"));
    assert!(ok && !err.contains("note:"), "the parquet's own order: nothing to say: {err}");
    // A class the head does not name: the labels are indices, and the note names the class.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("Fish")).unwrap();
    std::fs::copy(fixture("photos/class_1/china_61x47.jpg"), other.path().join("Fish/a.jpg")).unwrap();
    let (ok, _, err) = eval(other.path());
    assert!(ok && err.contains("names a class that head 'pets' does not ('Fish'); its labels are taken as"), "{err}");
}
