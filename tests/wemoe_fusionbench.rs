//! WEMoE against FusionBench's `WeightEnsemblingMoE` (fixtures of tools/make_wemoe_fixtures.py): loading
//! FusionBench's saved models, outputs and routing weights in both routing modes, our merge's tensors,
//! its key layout, and the routers' initial statistics.

mod common;

use std::path::Path;

use common::*;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::{CpuBackend, Precision};
use wemoe_engine::eval::{embed_dataset, Batching, Encoder};
use wemoe_engine::merge::{merge, Expert, MergeMethod, MergeOptions};
use wemoe_engine::model::{ImageEncoder, RouterActivation, Routing, StreamedEncoder};
use wemoe_engine::tensor::Tensor;

const EXPERTS: [&str; 3] = ["red", "green", "blue"];

fn wemoe(name: &str) -> std::path::PathBuf {
    fixture(&format!("wemoe/{name}"))
}

/// Routing weights as `[L, B, T]`, a `[1, T]` layer broadcast to the batch.
fn stacked(routing: &[Tensor], batch: usize) -> Vec<f32> {
    routing
        .iter()
        .flat_map(|c| {
            let v = c.host().unwrap().to_vec();
            if c.shape()[0] == 1 {
                v.repeat(batch)
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn fusionbench_models_run_like_fusionbench_in_both_routing_modes() {
    let be = CpuBackend::new();
    let (shape, pixels) = reference("wemoe/pixels.safetensors", "pixel_values");
    let pixels = Tensor::from_vec(&shape, pixels).unwrap();
    for depth in 0..3 {
        let dir = ModelDir::open(&wemoe(&format!("fusionbench_d{depth}"))).unwrap();
        let spec = dir.wemoe.as_ref().expect("FusionBench's layout is recognised");
        assert_eq!((spec.router_layers, spec.num_experts()), (depth, 3));
        let model = ImageEncoder::load(&be, &dir).unwrap();
        for (mode, routing) in [("sample", Routing::Sample), ("batch", Routing::Batch)] {
            let out = model.encode(&be, &pixels, routing).unwrap();
            let key = format!("d{depth}.{mode}");
            let want = reference("wemoe/expected.safetensors", &format!("{key}.pooler_output")).1;
            assert_close(&format!("{key} pooler_output"), out.pooled.host().unwrap(), &want);
            let want = reference("wemoe/expected.safetensors", &format!("{key}.routing_weights")).1;
            assert_close(&format!("{key} routing_weights"), &stacked(&out.routing_weights, shape[0]), &want);
        }
    }
}

/// FusionBench's saved depth-2 model, loaded on the CPU, and the fixture's five images as a dataset.
fn fusionbench_d2() -> (CpuBackend, ModelDir, Dataset, ImageEncoder) {
    let be = CpuBackend::new();
    let dir = ModelDir::open(&wemoe("fusionbench_d2")).unwrap();
    let side = dir.config.image_size;
    let data = Dataset::open(&wemoe("pixels.safetensors"), &Preprocess::clip(side), side).unwrap();
    let model = ImageEncoder::load(&be, &dir).unwrap();
    (be, dir, data, model)
}

/// A streamed pass (each layer loaded once per span of batches, then dropped) gives the resident pass's
/// outputs bit for bit in both routing modes, over two spans and a ragged last batch, and its progress
/// rises to every image.
#[test]
fn streamed_layers_give_the_resident_outputs_exactly() {
    let (be, dir, data, resident) = fusionbench_d2();
    assert_eq!(data.len(), 5);
    // An image's hidden states are 10 tokens × 32 × 4 bytes: two batches of two images per span, so the
    // spans are images [0, 4) and [4, 5).
    let streamed = StreamedEncoder::load(&be, &dir).unwrap().with_span_bytes(2 * 2 * 10 * 32 * 4);
    assert_eq!(streamed.batches_per_span(2), 2);
    for routing in [Routing::Sample, Routing::Batch] {
        let batching = Batching { size: 2, routing };
        let want = embed_dataset(&be, Encoder::Resident(&resident), &data, batching, &mut |_| {}).unwrap();
        let mut seen = Vec::new();
        let got = embed_dataset(&be, Encoder::Streamed(&streamed), &data, batching, &mut |n| seen.push(n)).unwrap();
        assert_eq!(got.pooled, want.pooled, "{routing:?} pooled");
        assert_eq!(got.image_embeds, want.image_embeds, "{routing:?} image_embeds");
        assert_eq!(got.routing_weights, want.routing_weights, "{routing:?} routing_weights");
        assert_eq!(got.routing_weights.len(), 2);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.last() == Some(&5), "{routing:?} progress {seen:?}");
    }
    assert!(streamed.layer_load_seconds() > 0.0);
}

/// Batch routing averages each group of `--batch-size` consecutive images, the last one smaller, as FusionBench's
/// DataLoader hands them over: 5 images in groups of 3 are routed as images 0–2 alone, then images 3–4 alone.
#[test]
fn batch_routing_averages_each_group_the_last_one_smaller() {
    let (be, _, data, model) = fusionbench_d2();
    let grouped = Batching { size: 3, routing: Routing::Batch };
    let got = embed_dataset(&be, Encoder::Resident(&model), &data, grouped, &mut |_| {}).unwrap().pooled;
    let width = got.len() / data.len();
    for group in [0..3, 3..5] {
        let alone = model.encode(&be, &data.batch(group.clone()).unwrap(), Routing::Batch).unwrap();
        let want = alone.pooled.host().unwrap();
        assert_eq!(&got[group.start * width..group.end * width], want, "images {group:?}");
    }
    // The grouping matters with these routers: one group of all five routes otherwise.
    let one_group = model.encode(&be, &data.batch(0..5).unwrap(), Routing::Batch).unwrap();
    assert!(rel_err(&got, one_group.pooled.host().unwrap()) > 1e-3);
}

/// `--precision bf16` on the CPU: where the CPU has a bf16 unit (AMX, or AMD's AVX-512 BF16), both routing
/// modes within the bf16 tolerance of FusionBench's f32 outputs, and really rounded (further from them than f32
/// is); elsewhere refused with a message that names what is missing.
#[test]
fn bf16_on_the_cpu_is_within_its_tolerance_or_refused() {
    let be = match CpuBackend::with_precision(Precision::Bf16) {
        Ok(be) => be,
        Err(e) => {
            assert!(!wemoe_engine::ops::bf16::available() && format!("{e}").contains("needs AMX"), "{e}");
            return;
        }
    };
    let (shape, pixels) = reference("wemoe/pixels.safetensors", "pixel_values");
    let pixels = Tensor::from_vec(&shape, pixels).unwrap();
    let model = ImageEncoder::load(&be, &ModelDir::open(&wemoe("fusionbench_d2")).unwrap()).unwrap();
    for (mode, routing) in [("sample", Routing::Sample), ("batch", Routing::Batch)] {
        let out = model.encode(&be, &pixels, routing).unwrap();
        let want = reference("wemoe/expected.safetensors", &format!("d2.{mode}.pooler_output")).1;
        let e = rel_err(out.pooled.host().unwrap(), &want);
        println!("bf16 {mode}: {e:.2e} from FusionBench's f32");
        assert!(e > FORWARD_REL_TOL && e < BF16_REL_TOL, "bf16 {mode}: {e:.2e} from FusionBench's f32");
    }
}

fn options(method: MergeMethod) -> MergeOptions {
    MergeOptions { method, scaling: 0.3, router_layers: 2, router_activation: RouterActivation::Identity, seed: 0 }
}

fn merged(method: MergeMethod, out: &Path) -> ModelDir {
    let pretrained = ModelDir::open(&wemoe("pretrained")).unwrap();
    let experts: Vec<Expert> =
        EXPERTS.iter().map(|n| Expert { name: n.to_string(), model: ModelDir::open(&wemoe(n)).unwrap() }).collect();
    merge(&pretrained, &experts, &options(method), out, &mut |_, _| {}).unwrap();
    ModelDir::open(out).unwrap()
}

fn values(dir: &ModelDir, name: &str) -> Vec<f32> {
    dir.store.get_any(name).unwrap().host().unwrap().to_vec()
}

#[test]
fn our_wemoe_merge_has_fusionbenchs_layout_and_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = merged(MergeMethod::Wemoe, &tmp.path().join("m"));
    let theirs = ModelDir::open(&wemoe("fusionbench_d2")).unwrap();
    let names = |d: &ModelDir| d.store.names().map(str::to_string).collect::<Vec<_>>();
    // The same keys and shapes: what load_state_dict(strict=True) into FusionBench's module checks.
    assert_eq!(names(&ours), names(&theirs));
    for name in names(&theirs) {
        assert_eq!(ours.store.shape(&name), theirs.store.shape(&name), "{name}");
        if name.contains(".mlp.gate.") {
            continue; // re-drawn in the fixture; initialisation is tested below
        }
        let (a, b) = (values(&ours, &name), values(&theirs, &name));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: differs from FusionBench's by {worst:e}");
    }
    let spec = ours.wemoe.as_ref().unwrap();
    assert_eq!(spec.experts, EXPERTS);
    assert_eq!(spec.init_lambda, Some(0.3));
}

/// Mean and standard deviation over the layers' tensors `leaf` of a router.
fn stats(dir: &ModelDir, leaf: &str) -> (f64, f64) {
    let v: Vec<f64> = (0..2)
        .flat_map(|l| values(dir, &format!("vision_model.encoder.layers.{l}.mlp.gate.{leaf}")))
        .map(|x| x as f64)
        .collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (mean, (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt())
}

#[test]
fn our_router_init_has_fusionbenchs_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = merged(MergeMethod::Wemoe, &tmp.path().join("m"));
    let file = SafetensorsFile::open(&wemoe("fusionbench_init_d2.safetensors")).unwrap();
    let theirs_leaf = |leaf: &str| -> Vec<f64> {
        (0..2)
            .flat_map(|l| file.f32(&format!("encoder.layers.{l}.mlp.gate.{leaf}")).unwrap().host().unwrap().to_vec())
            .map(|x| x as f64)
            .collect()
    };
    for leaf in ["fc1.weight", "fc2.weight"] {
        let t = theirs_leaf(leaf);
        let t_mean = t.iter().sum::<f64>() / t.len() as f64;
        let t_std = (t.iter().map(|x| (x - t_mean).powi(2)).sum::<f64>() / t.len() as f64).sqrt();
        let (mean, std) = stats(&ours, leaf);
        assert!((std / t_std - 1.0).abs() < 0.15, "{leaf}: std {std} vs FusionBench's {t_std}");
        assert!(mean.abs() < 4.0 * std / (t.len() as f64).sqrt() + 1e-4, "{leaf}: mean {mean}");
    }
    for leaf in ["fc1.bias", "fc2.bias"] {
        let t = theirs_leaf(leaf);
        let o: Vec<f64> = (0..2)
            .flat_map(|l| values(&ours, &format!("vision_model.encoder.layers.{l}.mlp.gate.{leaf}")))
            .map(|x| x as f64)
            .collect();
        assert_eq!(o, t, "{leaf}: constant initialisation (0 and λ)");
    }
}

#[test]
fn task_arithmetic_and_average_merge_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrained = ModelDir::open(&wemoe("pretrained")).unwrap();
    let experts: Vec<ModelDir> = EXPERTS.iter().map(|n| ModelDir::open(&wemoe(n)).unwrap()).collect();
    for (method, dir) in [(MergeMethod::TaskArithmetic, "ta"), (MergeMethod::Average, "avg")] {
        let out = merged(method, &tmp.path().join(dir));
        assert!(out.wemoe.is_none());
        let scaling = (method == MergeMethod::TaskArithmetic).then_some(0.3);
        assert_eq!(
            (&out.json["merge"]["method"], &out.json["merge"]["experts"], out.json["merge"]["scaling"].as_f64()),
            (&serde_json::json!(method.name()), &serde_json::json!(EXPERTS), scaling),
            "{dir}: config.json's record of the merge"
        );
        let names: Vec<String> = pretrained.store.names().map(str::to_string).collect();
        assert_eq!(out.store.names().count(), names.len());
        for name in names {
            let base = values(&pretrained, &name);
            let thetas: Vec<Vec<f32>> = experts.iter().map(|e| values(e, &name)).collect();
            let got = values(&out, &name);
            for (i, g) in got.iter().enumerate() {
                let want = match method {
                    MergeMethod::Average => thetas.iter().map(|t| t[i] as f64).sum::<f64>() / 3.0,
                    _ => base[i] as f64 + 0.3 * thetas.iter().map(|t| (t[i] - base[i]) as f64).sum::<f64>(),
                };
                assert!((*g as f64 - want).abs() <= MERGE_TOL * (1.0 + want.abs()), "{dir} {name}[{i}]: {g} vs {want}");
            }
        }
    }
}

/// `embed` on the command line, with the layers streamed (the CPU's default) and resident.
#[test]
fn embed_writes_fusionbenchs_routing_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for weights in ["streamed", "resident"] {
        for (mode, key) in [("sample", "d2.sample"), ("batch", "d1.batch")] {
            let model = wemoe(&format!("fusionbench_{}", &key[..2]));
            let out = tmp.path().join(format!("{mode}-{weights}.safetensors"));
            let (ok, _, err) = engine(&[
                "embed",
                "--model",
                s(&model),
                "--images",
                s(&wemoe("pixels.safetensors")),
                "--out",
                s(&out),
                "--routing",
                mode,
                "--batch-size",
                "5",
                "--device",
                "cpu",
                "--weights",
                weights,
            ]);
            assert!(ok, "{err}");
            assert_eq!(err.contains("layer by layer"), weights == "streamed", "{weights}: {err}");
            let file = SafetensorsFile::open(&out).unwrap();
            let got = file.f32("routing_weights").unwrap();
            assert_eq!(got.shape(), &[2, 5, 3]);
            let want = reference("wemoe/expected.safetensors", &format!("{key}.routing_weights")).1;
            assert_close(&format!("{key} {weights} routing_weights"), got.host().unwrap(), &want);
            let want = reference("wemoe/expected.safetensors", &format!("{key}.pooler_output")).1;
            assert_close(
                &format!("{key} {weights} pooler_output"),
                file.f32("pooler_output").unwrap().host().unwrap(),
                &want,
            );
        }
    }
}

/// `WEMOE_MAX_CPU_ISA` caps the per-sample kernels (AVX-512, AVX2, portable): under each cap `doctor` names
/// the narrower of the cap and what this CPU has (what it names without a cap), and per-sample `embed` still
/// gives FusionBench's outputs; a value it does not know is named in a warning and ignored.
#[test]
fn every_cpu_kernel_set_runs_like_fusionbench() {
    const SETS: [(&str, &str); 3] = [("portable", "portable"), ("avx2", "AVX2"), ("avx512", "AVX-512")];
    let kernels_named = |env: &[(&str, &str)]| {
        let (ok, text, err) = engine_with_env(env, &["doctor"]);
        let cpu = text.lines().find(|l| l.starts_with("cpu")).unwrap_or_else(|| panic!("{text}{err}")).to_string();
        assert!(ok, "{err}");
        SETS.iter().position(|(_, name)| cpu.contains(&format!("threads, {name}"))).unwrap_or_else(|| panic!("{cpu}"))
    };
    let widest = kernels_named(&[]);
    let tmp = tempfile::tempdir().unwrap();
    for (i, (cap, _)) in SETS.iter().enumerate() {
        let env = [("WEMOE_MAX_CPU_ISA", *cap)];
        assert_eq!(kernels_named(&env), i.min(widest), "{cap} on a CPU whose widest is {}", SETS[widest].1);
        let out = tmp.path().join(format!("{cap}.safetensors"));
        let (model, images) = (wemoe("fusionbench_d2"), wemoe("pixels.safetensors"));
        let args =
            ["embed", "--model", s(&model), "--images", s(&images), "--out", s(&out), "--device", "cpu", "--quiet"];
        let (ok, _, err) = engine_with_env(&env, &args);
        assert!(ok && err.is_empty(), "{cap}: {err}");
        let file = SafetensorsFile::open(&out).unwrap();
        for tensor in ["pooler_output", "routing_weights"] {
            let want = reference("wemoe/expected.safetensors", &format!("d2.sample.{tensor}")).1;
            assert_close(&format!("{cap} {tensor}"), file.f32(tensor).unwrap().host().unwrap(), &want);
        }
    }
    let (ok, _, err) = engine_with_env(&[("WEMOE_MAX_CPU_ISA", "sse9")], &["doctor"]);
    assert!(ok && err.contains("WEMOE_MAX_CPU_ISA=sse9 ignored"), "{err}");
}

#[test]
fn merge_and_info_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe");
    let mut args = vec!["merge".to_string(), "--pretrained".into(), s(&wemoe("pretrained")).into()];
    for n in EXPERTS {
        args.extend(["--expert".to_string(), format!("{n}={}", s(&wemoe(n)))]);
    }
    args.extend([
        "--out".to_string(),
        s(&out).into(),
        "--router-layers".into(),
        "1".into(),
        "--router-activation".into(),
        "softmax".into(),
        "--quiet".into(),
    ]);
    let (ok, _, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let (ok, text, err) = engine(&["info", s(&out), "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(info["kind"], "WEMoE CLIPVisionModel");
    assert_eq!(info["wemoe"]["experts"], serde_json::json!(EXPERTS));
    assert_eq!(
        (info["wemoe"]["router_layers"].as_u64(), info["wemoe"]["router_activation"].as_str()),
        (Some(1), Some("softmax"))
    );
    assert_eq!(
        (&info["merge"]["method"], &info["merge"]["scaling"], &info["merge"]["seed"], &info["merge"]["experts"]),
        (&serde_json::json!("wemoe"), &serde_json::json!(0.3), &serde_json::json!(0), &serde_json::json!(EXPERTS))
    );
    // width 32, MLP 48, 2 layers, 3 experts: experts = 2·(1+3)·(2·32·48+48+32); depth-1 routers = 2·(3·32+3).
    let p = &info["parameters"];
    assert_eq!((p["experts"].as_u64(), p["routers"].as_u64()), (Some(2 * 4 * (2 * 32 * 48 + 80)), Some(2 * 99)));
    // A softmax router's coefficients sum to one for every image.
    let emb = tmp.path().join("e.safetensors");
    let (ok, _, err) = engine(&[
        "embed",
        "--model",
        s(&out),
        "--images",
        s(&wemoe("pixels.safetensors")),
        "--out",
        s(&emb),
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let w = SafetensorsFile::open(&emb).unwrap().f32("routing_weights").unwrap();
    for row in w.host().unwrap().chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
}

#[test]
fn eval_of_a_fusionbench_model_in_both_routing_modes() {
    // Heads with their own projection (the WEMoE model has none). Class 2i is image i's projected embedding under
    // FusionBench's per-sample routing, class 2i+1 under its batch routing; the labels are 2i. So per-sample
    // routing must score 1 and batch routing 0: a mode mixed up, or an output off by more than the tiny margins
    // between those classes, fails.
    use wemoe_engine::output::{write_safetensors, NamedTensor};
    let tmp = tempfile::tempdir().unwrap();
    let (p, d, images) = (8usize, 32usize, 5usize);
    let projection: Vec<f32> = (0..p * d).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
    let embeddings = |key: &str| -> Vec<Vec<f32>> {
        let pooled = reference("wemoe/expected.safetensors", &format!("{key}.pooler_output")).1;
        pooled
            .chunks(d)
            .map(|x| {
                let e: Vec<f32> = (0..p).map(|i| (0..d).map(|j| projection[i * d + j] * x[j]).sum()).collect();
                let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
                e.into_iter().map(|v| v / norm).collect()
            })
            .collect()
    };
    let (sample, batch) = (embeddings("d2.sample"), embeddings("d2.batch"));
    let head: Vec<f32> =
        (0..images).flat_map(|i| sample[i].iter().chain(&batch[i]).copied().collect::<Vec<_>>()).collect();
    let heads = tmp.path().join("heads.safetensors");
    write_safetensors(
        &heads,
        &[
            NamedTensor { name: "head.twins".into(), shape: vec![2 * images, p], values: head },
            NamedTensor { name: "visual_projection.weight".into(), shape: vec![p, d], values: projection.clone() },
        ],
    )
    .unwrap();
    let (shape, pixels) = reference("wemoe/pixels.safetensors", "pixel_values");
    let labels: Vec<u8> = (0..images as i64).flat_map(|i| (2 * i).to_le_bytes()).collect();
    let pixel_bytes: Vec<u8> = pixels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        ("pixel_values", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &pixel_bytes).unwrap()),
        ("labels", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![images], &labels).unwrap()),
    ];
    let data = tmp.path().join("data.safetensors");
    std::fs::write(&data, safetensors::serialize(views, None).unwrap()).unwrap();
    for (mode, accuracy) in [("sample", 1.0), ("batch", 0.0)] {
        let json = tmp.path().join(format!("{mode}.json"));
        let (ok, _, err) = engine(&[
            "eval",
            "--model",
            s(&wemoe("fusionbench_d2")),
            "--heads",
            s(&heads),
            "--task",
            &format!("twins={}", s(&data)),
            "--routing",
            mode,
            "--batch-size",
            "5",
            "--json",
            s(&json),
            "--device",
            "cpu",
        ]);
        assert!(ok, "{err}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["tasks"]["twins"]["accuracy"].as_f64().unwrap(), accuracy, "{mode}");
    }
}
