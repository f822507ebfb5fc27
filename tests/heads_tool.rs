//! Heads written by tools/make_heads.py (fixtures of tools/make_heads_fixtures.py): through the engine they give
//! FusionBench's `HFCLIPClassifier` logits, and each data task's rows follow the engine's label ids.

mod common;

use common::*;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::CpuBackend;
use wemoe_engine::model::{Heads, ImageEncoder, Routing};
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
