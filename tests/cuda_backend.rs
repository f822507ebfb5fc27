//! The whole model graph on the CUDA backend, over the host emulation of its kernels, against the same real
//! references as the CPU backend: HF transformers' outputs for three CLIP models, FusionBench's WEMoE
//! outputs and routing weights in both routing modes, and torch autograd's router gradients through
//! FusionBench's module. Every operation of the forward and of the adaptation's backward runs as the CUDA
//! kernels and launch code a GPU runs (plain dense products on the executor's vendor GEMM, as cuBLAS runs
//! them on a card, or on the engine's own kernels); the `gpu` tests run the same on a card
//! (tools/gpu-check.sh, with `--ignored`).

mod common;

use common::*;
use wemoe_engine::autograd::entropy_loss_and_router_gradients;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};
use wemoe_engine::cuda::{GpuExecutor, HostExecutor};
use wemoe_engine::device::{Backend, CudaBackend, Device, Precision, WemoeKernels};
use wemoe_engine::merge::{AdaMerging, Expert};
use wemoe_engine::model::{Heads, ImageEncoder, Routing, StreamedEncoder};
use wemoe_engine::tensor::Tensor;

fn emulated() -> CudaBackend<HostExecutor> {
    CudaBackend::new(HostExecutor, Device::Cuda(0))
}

fn gpu() -> CudaBackend<GpuExecutor> {
    CudaBackend::new(GpuExecutor::new(0).expect("a CUDA device"), Device::Cuda(0))
}

fn host(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    be.to_host(t).unwrap()
}

fn clip_models_match_transformers(be: &dyn Backend) {
    for key in ["a", "b", "c"] {
        let dir = ModelDir::open(&fixture(&format!("clip_{key}"))).unwrap();
        let model = ImageEncoder::load(be, &dir).unwrap();
        let (shape, pixels) = reference(&format!("pixels_{key}.safetensors"), "pixel_values");
        let pixels = be.upload(Tensor::from_vec(&shape, pixels).unwrap()).unwrap();
        let out = model.encode(be, &pixels, Routing::Sample).unwrap();
        assert_eq!(out.pooled.device(), Device::Cuda(0), "computed on the device");
        let expected = format!("expected_{key}.safetensors");
        assert_close(
            &format!("clip_{key} pooler_output"),
            &host(be, &out.pooled),
            &reference(&expected, "pooler_output").1,
        );
        if let Some(e) = &out.image_embeds {
            assert_close(&format!("clip_{key} image_embeds"), &host(be, e), &reference(&expected, "image_embeds").1);
        }
        let heads = Heads::open(be, &fixture(&format!("heads_{key}.safetensors"))).unwrap();
        let classifier = heads.classifier(&model, &dir.path).unwrap();
        for task in heads.task_names() {
            let logits = classifier.logits(be, &out.pooled, heads.head(task).unwrap()).unwrap();
            let want = reference(&expected, &format!("logits.{task}")).1;
            assert_close(&format!("clip_{key} logits {task}"), &host(be, &logits), &want);
        }
    }
}

/// Resident, and with the layers streamed (`StreamedEncoder`, each layer uploaded, used and dropped), whose
/// outputs must equal the resident pass's exactly.
fn wemoe_models_match_fusionbench_in_both_routing_modes(be: &dyn Backend) {
    let (shape, values) = reference("wemoe/pixels.safetensors", "pixel_values");
    let upload = || be.upload(Tensor::from_vec(&shape, values.clone()).unwrap());
    let pixels = upload().unwrap();
    for depth in 0..3 {
        let dir = ModelDir::open(&fixture(&format!("wemoe/fusionbench_d{depth}"))).unwrap();
        let model = ImageEncoder::load(be, &dir).unwrap();
        let streamed = StreamedEncoder::load(be, &dir).unwrap();
        for (mode, routing) in [("sample", Routing::Sample), ("batch", Routing::Batch)] {
            let out = model.encode(be, &pixels, routing).unwrap();
            let layered = streamed.encode(be, 1, &mut |_| upload(), routing, &mut |_| {}).unwrap();
            assert_eq!(host(be, &layered[0].pooled), host(be, &out.pooled), "d{depth} {mode}: streamed pooled");
            assert_eq!(layered[0].routing_weights.len(), out.routing_weights.len());
            for (a, b) in layered[0].routing_weights.iter().zip(&out.routing_weights) {
                assert_eq!(host(be, a), host(be, b), "d{depth} {mode}: streamed routing weights");
            }
            let key = format!("d{depth}.{mode}");
            let want = reference("wemoe/expected.safetensors", &format!("{key}.pooler_output")).1;
            assert_close(&format!("{key} pooler_output"), &host(be, &out.pooled), &want);
            let routing: Vec<f32> = out
                .routing_weights
                .iter()
                .flat_map(|c| {
                    let v = host(be, c);
                    if c.shape()[0] == 1 {
                        v.repeat(shape[0])
                    } else {
                        v
                    }
                })
                .collect();
            let want = reference("wemoe/expected.safetensors", &format!("{key}.routing_weights")).1;
            assert_close(&format!("{key} routing_weights"), &routing, &want);
        }
    }
}

fn router_gradients_match_torch(be: &dyn Backend) {
    let dir = ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap();
    let model = ImageEncoder::load(be, &dir).unwrap();
    let heads = Heads::open(be, &fixture("adapt/heads.safetensors")).unwrap();
    let classifier = heads.classifier(&model, &dir.path).unwrap();
    let expected = SafetensorsFile::open(&fixture("adapt/expected.safetensors")).unwrap();
    for (mode, routing) in [("sample", Routing::Sample), ("batch", Routing::Batch)] {
        let mut tasks = adapt_tasks(&heads);
        for t in &mut tasks {
            t.pixels = be.upload(std::mem::replace(&mut t.pixels, Tensor::zeros(&[0]))).unwrap();
        }
        let (loss, grads) = entropy_loss_and_router_gradients(be, &model, &classifier, &tasks, routing).unwrap();
        let want = expected.f32(&format!("{mode}.loss")).unwrap().host().unwrap()[0] as f64;
        assert!((loss - want).abs() <= 1e-5 * want.abs(), "{mode} loss {loss} vs torch {want}");
        let names: Vec<String> =
            expected.names().filter_map(|n| n.strip_prefix(&format!("{mode}.grad.")).map(str::to_string)).collect();
        assert_eq!(grads.len(), names.len(), "a gradient for every router tensor and nothing else");
        for name in names {
            let ours = grads.get(&format!("vision_model.{name}")).unwrap_or_else(|| panic!("no gradient for {name}"));
            let theirs = expected.f32(&format!("{mode}.grad.{name}")).unwrap();
            assert_eq!(ours.shape(), theirs.shape(), "{name}");
            let e = rel_err(&host(be, ours), theirs.host().unwrap());
            assert!(e <= 1e-4, "{mode} {name}: gradient off by {e:.2e} relative");
        }
    }
}

/// Layer-wise AdaMerging's gradient with respect to every coefficient, which needs every parameter's gradient
/// (linear weights through the backend's weight-gradient product, LayerNorm and embedding parameters through
/// its reductions), the model merged from task vectors held on the device and the gradients contracted with
/// them there: as FusionBench's `LayerWiseMergedModel` gives it.
fn adamerging_gradients_match_fusionbench(be: &dyn Backend) {
    let pretrained = ModelDir::open(&fixture("wemoe/pretrained")).unwrap();
    let experts: Vec<Expert> = ["red", "green", "blue"]
        .iter()
        .map(|n| Expert { name: n.to_string(), model: ModelDir::open(&fixture(&format!("wemoe/{n}"))).unwrap() })
        .collect();
    let run = AdaMerging::new(be, &pretrained, &experts).unwrap();
    let coefficients = run.initial(0.3);
    let model = run.model(be, &coefficients).unwrap();
    let heads = Heads::open(be, &fixture("adapt/heads.safetensors")).unwrap();
    let mut tasks = adapt_tasks(&heads);
    for t in &mut tasks {
        t.pixels = be.upload(std::mem::replace(&mut t.pixels, Tensor::zeros(&[0]))).unwrap();
    }
    let (loss, grads) = run.loss_and_gradient(be, &model, &coefficients, &heads, &tasks).unwrap();
    let (_, want_loss) = reference("adamerging/expected.safetensors", "loss");
    assert!((loss - want_loss[0] as f64).abs() <= 1e-5 * want_loss[0] as f64, "loss {loss} vs {}", want_loss[0]);
    let (_, want) = reference("adamerging/expected.safetensors", "grad");
    let got: Vec<f32> =
        (0..experts.len()).flat_map(|t| run.names().iter().map(move |n| (n, t))).map(|(n, t)| grads[n][t]).collect();
    let e = rel_err(&got, &want);
    assert!(e <= 1e-4, "coefficient gradients off by {e:.2e} relative");
}

/// `--precision tf32|bf16`: the forward's linear layers on tensor cores (emulated here): close to the f32
/// reference within the format's tolerance, and really computed in it (not equal to the f32 result).
fn reduced_precision_forward_is_within_its_tolerance(
    f32_backend: &dyn Backend,
    reduced: &dyn Backend,
    precision: Precision,
) {
    let tol = match precision {
        Precision::F32 => unreachable!("a reduced precision"),
        Precision::Tf32 => TF32_REL_TOL,
        Precision::Bf16 => BF16_REL_TOL,
    };
    let dir = ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap();
    let (shape, pixels) = reference("wemoe/pixels.safetensors", "pixel_values");
    let mut pooled = Vec::new();
    for be in [f32_backend, reduced] {
        let model = ImageEncoder::load(be, &dir).unwrap();
        let pixels = be.upload(Tensor::from_vec(&shape, pixels.clone()).unwrap()).unwrap();
        pooled.push(host(be, &model.encode(be, &pixels, Routing::Sample).unwrap().pooled));
    }
    let e = rel_err(&pooled[1], &pooled[0]);
    println!("{precision} against f32: {e:.2e}");
    assert!(e > 0.0 && e < tol, "{precision} against f32: {e:.2e} (tolerance {tol:e})");
}

#[test]
fn tf32_forward_on_the_emulated_backend() {
    reduced_precision_forward_is_within_its_tolerance(
        &emulated(),
        &emulated().with_precision(Precision::Tf32),
        Precision::Tf32,
    );
}

#[test]
fn bf16_forward_on_the_emulated_backend() {
    reduced_precision_forward_is_within_its_tolerance(
        &emulated(),
        &emulated().with_precision(Precision::Bf16),
        Precision::Bf16,
    );
}

#[test]
#[ignore = "needs a GPU: tools/gpu-check.sh runs these with --ignored"]
fn tf32_forward_on_the_gpu() {
    reduced_precision_forward_is_within_its_tolerance(&gpu(), &gpu().with_precision(Precision::Tf32), Precision::Tf32);
}

#[test]
#[ignore = "needs a GPU: tools/gpu-check.sh runs these with --ignored"]
fn bf16_forward_on_the_gpu() {
    reduced_precision_forward_is_within_its_tolerance(&gpu(), &gpu().with_precision(Precision::Bf16), Precision::Bf16);
}

/// `adapt` itself (task streams, tape, Adam, checkpoints, the written model) on the CUDA backend against the
/// CPU backend: 3 steps of per-sample routing, the losses and the routers' updates alike.
fn adaptation_matches_the_cpu_backend(be: &dyn Backend) {
    use wemoe_engine::adapt::{adapt, AdaptOptions, Schedule};
    use wemoe_engine::data::{Dataset, Preprocess};
    use wemoe_engine::device::CpuBackend;
    let dir = ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap();
    let preprocess = Preprocess::for_model(&dir.path, dir.config.image_size).unwrap();
    let tasks: Vec<(String, std::path::PathBuf)> =
        ["left", "right"].iter().map(|t| (t.to_string(), fixture(&format!("adapt/{t}.safetensors")))).collect();
    let opts = AdaptOptions {
        steps: 3,
        lr: 1e-3,
        batch_size: 3,
        routing: Routing::Sample,
        schedule: Schedule::Constant,
        seed: 7,
        checkpoint_every: 2,
    };
    let out = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (name, backend) in [("cpu", &CpuBackend::new() as &dyn Backend), ("cuda", be)] {
        let heads = Heads::open(backend, &fixture("adapt/heads.safetensors")).unwrap();
        let data: Vec<Dataset> =
            tasks.iter().map(|(_, p)| Dataset::open(p, &preprocess, dir.config.image_size).unwrap()).collect();
        let target = out.path().join(name);
        let mut losses = Vec::new();
        adapt(backend, &dir, &heads, &tasks, &data, &opts, &target, false, &mut |r| losses.push(r.loss)).unwrap();
        results.push((losses, SafetensorsFile::open(&target.join("model.safetensors")).unwrap()));
    }
    let (cpu, cuda) = (&results[0], &results[1]);
    for (a, b) in cpu.0.iter().zip(&cuda.0) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "losses {:?} against {:?}", cpu.0, cuda.0);
    }
    let mut routers = 0;
    for name in cpu.1.names().filter(|n| n.contains(".mlp.gate.")) {
        let initial = dir.store.get_any(name).unwrap();
        let update = |f: &SafetensorsFile| -> Vec<f32> {
            let t = f.f32(name).unwrap();
            t.host().unwrap().iter().zip(initial.host().unwrap()).map(|(a, b)| a - b).collect()
        };
        let (ours, reference) = (update(&cuda.1), update(&cpu.1));
        let diff: f64 = ours.iter().zip(&reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = reference.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0 && diff <= 2e-3 * norm, "{name}: update off by {:.2e} relative", diff / norm);
        routers += 1;
    }
    assert_eq!(routers, 8, "two layers of depth-2 routers");
}

/// The backend on the engine's own kernels alone (the default runs plain dense products on the executor's
/// vendor GEMM: cuBLAS, or the CPU GEMM in the emulation; and times every WEMoE candidate kernel per shape,
/// so the `host` tests above run them all), with each WEMoE product's sources loaded as they merge, or
/// staged by `cp.async` (the emulation lands the copies at their waits): the same references, forward and
/// router gradients.
fn own_kernels_match_fusionbench_and_torch(be: &dyn Backend) {
    wemoe_models_match_fusionbench_in_both_routing_modes(be);
    router_gradients_match_torch(be);
}

/// The default backend times every candidate WEMoE kernel for each per-sample shape it meets and keeps one:
/// here all of them ran (on a card, one it cannot run is reported and passed over), and the gradients that
/// the chosen kernels give still match torch's.
#[test]
fn the_default_backend_times_every_candidate_per_shape() {
    let be = emulated();
    router_gradients_match_torch(&be);
    let (forward, input) = be.kernel_choices();
    assert!(!forward.is_empty() && !input.is_empty(), "per-sample products were timed");
    for c in &forward {
        assert_eq!(c.timings.len(), 6, "{c}");
        assert!(c.timings.iter().all(|(_, t)| t.is_ok()), "{c}");
    }
    for c in &input {
        assert_eq!(c.timings.len(), 3, "{c}");
        assert!(c.timings.iter().all(|(_, t)| t.is_ok()), "{c}");
    }
    println!("{}", forward.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("\n"));
}

#[test]
fn own_kernels_on_the_emulated_backend() {
    own_kernels_match_fusionbench_and_torch(
        &emulated().with_vendor_products(false).with_wemoe_kernels(WemoeKernels::Direct),
    );
}

#[test]
fn own_staged_kernels_on_the_emulated_backend() {
    own_kernels_match_fusionbench_and_torch(
        &emulated().with_vendor_products(false).with_wemoe_kernels(WemoeKernels::Staged),
    );
}

#[test]
#[ignore = "needs a GPU: tools/gpu-check.sh runs these with --ignored"]
fn own_kernels_on_the_gpu() {
    own_kernels_match_fusionbench_and_torch(
        &gpu().with_vendor_products(false).with_wemoe_kernels(WemoeKernels::Direct),
    );
}

#[test]
#[ignore = "needs a GPU: tools/gpu-check.sh runs these with --ignored"]
fn own_staged_kernels_on_the_gpu() {
    own_kernels_match_fusionbench_and_torch(
        &gpu().with_vendor_products(false).with_wemoe_kernels(WemoeKernels::Staged),
    );
}

macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod host {
            $(#[test]
            fn $case() {
                super::$case(&super::emulated());
            })*
        }
        mod gpu {
            $(#[test]
            #[ignore = "needs a GPU: tools/gpu-check.sh runs these with --ignored"]
            fn $case() {
                super::$case(&super::gpu());
            })*
        }
    };
}

on_both!(
    clip_models_match_transformers,
    wemoe_models_match_fusionbench_in_both_routing_modes,
    router_gradients_match_torch,
    adaptation_matches_the_cpu_backend,
    adamerging_gradients_match_fusionbench,
);
