//! CPU benchmarks: the GEMM at the ViT MLP shapes, the ViT-B/32-shaped forward (random weights, batch 16),
//! one WEMoE MLP layer at ViT-B/32 shapes with 8 experts against the dense MLP, the WEMoE MLP's three
//! formulations (fused per-sample, batch-reduced, materialise-then-GEMM) and batch routing's merge of each
//! weight alone, and one adaptation step. The GEMM and the WEMoE layer also with bf16 products where the CPU
//! has a unit for them (`--precision bf16`). And
//! CLIP's preprocessing at 224 (a 500 × 375 image; the fixture photographs decoded from their files). And the
//! B/32 text tower on 256 prompts of 12 tokens (`wemoe-engine heads`).
//! `cargo bench --bench cpu`; figures and machine in BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wemoe_engine::config::VisionConfig;
use wemoe_engine::data::{decode_image, Dataset, Preprocess};
use wemoe_engine::device::{CpuBackend, Precision};
use wemoe_engine::model::{
    ClipMlp, ImageEncoder, Linear, RandomWeights, RouterActivation, Routing, WemoeMlp, WemoeSpec,
};
use wemoe_engine::ops::bf16;
use wemoe_engine::ops::gemm::{matmul, MatRef, Threads};
use wemoe_engine::tensor::Tensor;
use wemoe_engine::text::{ClipText, TextConfig};

fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    for (m, k, n) in [(3200usize, 768usize, 3072usize), (3200, 3072, 768)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut out = vec![0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        // [in, out] weights, as the CPU backend prepares them; and PyTorch's [out, in] for comparison.
        for (layout, rhs) in
            [("in_out", MatRef::row_major(&b, k, n).unwrap()), ("out_in", MatRef::row_major(&b, n, k).unwrap().t())]
        {
            let id = BenchmarkId::new(layout, format!("{m}x{k}x{n}"));
            let lhs = MatRef::row_major(&a, m, k).unwrap();
            group.bench_function(id, |bench| bench.iter(|| matmul(lhs, rhs, &mut out, false, Threads::All).unwrap()));
        }
        // --precision bf16 (AMX or AVX-512 BF16), the right side packed per call as the CPU backend does.
        if bf16::available() {
            let id = BenchmarkId::new("bf16", format!("{m}x{k}x{n}"));
            group.bench_function(id, |bench| {
                bench.iter(|| bf16::linear(&a, m, k, &bf16::pack_rhs(&b, k, n).unwrap(), None))
            });
        }
    }
    group.finish();
}

fn vit_b32_forward(c: &mut Criterion) {
    let be = CpuBackend::new();
    let config = VisionConfig::default();
    let model = ImageEncoder::random(&be, &config, None, 0).unwrap();
    let batch = 16;
    let s = config.image_size;
    let pixels =
        Tensor::from_vec(&[batch, 3, s, s], (0..batch * 3 * s * s).map(|i| ((i % 255) as f32) / 128.0 - 1.0).collect())
            .unwrap();
    let mut group = c.benchmark_group("vit_b32_forward");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("batch16_images", |bench| bench.iter(|| model.encode(&be, &pixels, Routing::Sample).unwrap()));
    group.finish();
}

fn wemoe_layer(c: &mut Criterion) {
    let be = CpuBackend::new();
    let config = VisionConfig::default();
    let src = RandomWeights::new(1);
    let spec = WemoeSpec {
        experts: (0..8).map(|t| format!("task{t}")).collect(),
        router_layers: 2,
        router_activation: RouterActivation::Identity,
        init_lambda: Some(0.3),
    };
    let moe = WemoeMlp::load(&be, &src, "vision_model.encoder.layers.0.mlp", &config, &spec).unwrap();
    let (d, i) = (config.hidden_size, config.intermediate_size);
    let dense = ClipMlp {
        fc1: Linear::load(&be, &src, "dense.fc1", i, d, true).unwrap(),
        fc2: Linear::load(&be, &src, "dense.fc2", d, i, true).unwrap(),
        activation: config.hidden_act,
    };
    let mut group = c.benchmark_group("wemoe_mlp_b32_8experts");
    group.sample_size(10);
    for batch in [16usize, 64] {
        let n = config.tokens();
        let h = Tensor::from_vec(&[batch, n, d], (0..batch * n * d).map(|i| ((i % 91) as f32 - 45.0) / 30.0).collect())
            .unwrap();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("per_sample", batch), |b| {
            b.iter(|| moe.forward(&be, &h, Routing::Sample).unwrap())
        });
        group.bench_function(BenchmarkId::new("batch", batch), |b| {
            b.iter(|| moe.forward(&be, &h, Routing::Batch).unwrap())
        });
        group.bench_function(BenchmarkId::new("dense_mlp", batch), |b| b.iter(|| dense.forward(&be, &h).unwrap()));
        // --precision bf16 (the CPU backend prepares weights alike in both precisions).
        if let Ok(bf16) = CpuBackend::with_precision(Precision::Bf16) {
            for (id, routing) in [("per_sample_bf16", Routing::Sample), ("batch_bf16", Routing::Batch)] {
                group.bench_function(BenchmarkId::new(id, batch), |b| {
                    b.iter(|| moe.forward(&bf16, &h, routing).unwrap())
                });
            }
            group.bench_function(BenchmarkId::new("dense_mlp_bf16", batch), |b| {
                b.iter(|| dense.forward(&bf16, &h).unwrap())
            });
        }
    }
    group.finish();
}

/// The WEMoE MLP's CPU formulations at ViT-B/32 widths with 8 experts (fc1, quick_gelu, fc2): per-sample
/// fused (each weight tile merged once per sample, never a whole merged weight), batch-reduced (one merge,
/// dense GEMMs), and per-sample materialise-then-GEMM (the whole merged weights of each sample, then dense
/// GEMMs); B = 16 at B/32's 50 tokens and B/16's 197.
fn wemoe_mlp_formulations(c: &mut Criterion) {
    use wemoe_engine::device::Activation;
    use wemoe_engine::ops::activation::activation_in_place;
    use wemoe_engine::ops::expert_linear::{
        expert_linear, expert_linear_backward, expert_mlp, to_blocked, ExpertLinearRef,
    };
    use wemoe_engine::ops::gemm::linear;
    use wemoe_engine::rng::Rng;
    let (d, h, t) = (768usize, 3072usize, 8usize);
    let mut rng = Rng::new(5);
    // Weights as the CPU backend stores them: blocked.
    let mut layer = |inp: usize, out: usize| {
        let base = to_blocked(&rng.normal_vec(out * inp, 0.0, 0.02), out, inp);
        let bias = rng.normal_vec(out, 0.0, 0.02);
        let tasks: Vec<Vec<f32>> =
            (0..t).map(|_| to_blocked(&rng.normal_vec(out * inp, 0.0, 0.002), out, inp)).collect();
        let task_biases: Vec<Vec<f32>> = (0..t).map(|_| rng.normal_vec(out, 0.0, 0.002)).collect();
        (base, bias, tasks, task_biases, inp, out)
    };
    let (l1, l2) = (layer(d, h), layer(h, d));
    type HostLayer = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>, usize, usize);
    fn view(l: &HostLayer) -> ExpertLinearRef<'_> {
        ExpertLinearRef {
            base_weight: &l.0,
            base_bias: &l.1,
            task_weights: l.2.iter().map(|v| v.as_slice()).collect(),
            task_biases: l.3.iter().map(|v| v.as_slice()).collect(),
            out_features: l.5,
            in_features: l.4,
        }
    }
    let (w1, w2) = (view(&l1), view(&l2));
    let mut group = c.benchmark_group("wemoe_mlp_formulations_b32_widths_8experts");
    group.sample_size(10);
    // Batch routing's one merge of each weight, apart from its product.
    let one = rng.normal_vec(t, 0.3, 0.1);
    group.bench_function("merge_fc1", |b| b.iter(|| w1.merged(&one)));
    group.bench_function("merge_fc2", |b| b.iter(|| w2.merged(&one)));
    // Batch routing's backward of fc1 for one task of 16 images, with the input gradient and without it (the
    // first WEMoE layer's, whose input depends on no router).
    let rows = 16 * 50;
    let (x1, dy1) = (rng.normal_vec(rows * d, 0.0, 1.0), rng.normal_vec(rows * h, 0.0, 1.0));
    for (id, input_gradient) in [("backward_fc1_with_dx", true), ("backward_fc1_without_dx", false)] {
        group.bench_function(id, |b| {
            b.iter(|| expert_linear_backward(&x1, 1, rows, &one, &w1, &dy1, input_gradient).unwrap())
        });
    }
    let batch = 16;
    for tokens in [50usize, 197] {
        let x = rng.normal_vec(batch * tokens * d, 0.0, 1.0);
        let coeff = rng.normal_vec(batch * t, 0.3, 0.1);
        let mlp = |groups: usize, coeff: &[f32]| {
            let mut hid = expert_linear(&x, groups, batch * tokens / groups, coeff, &w1).unwrap();
            activation_in_place(&mut hid, Activation::QuickGelu);
            expert_linear(&hid, groups, batch * tokens / groups, coeff, &w2).unwrap()
        };
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("per_sample_fused", tokens), |b| b.iter(|| mlp(batch, &coeff)));
        // The same MLP as one call: the hidden layer kept in fc1's stripes, activated there.
        group.bench_function(BenchmarkId::new("per_sample_expert_mlp", tokens), |b| {
            b.iter(|| expert_mlp(&x, batch, tokens, &coeff, &w1, &w2, Activation::QuickGelu).unwrap())
        });
        // Batch routing: one merge per weight. As the engine runs it (the tiles merged once, in cache), and as
        // it ran before: each weight merged whole, then dense products (the `gemm` crate).
        group.bench_function(BenchmarkId::new("batch_expert_mlp", tokens), |b| {
            b.iter(|| expert_mlp(&x, 1, batch * tokens, &coeff[..t], &w1, &w2, Activation::QuickGelu).unwrap())
        });
        group.bench_function(BenchmarkId::new("batch_reduced_dense", tokens), |b| {
            b.iter(|| {
                let (m1, b1) = w1.merged(&coeff[..t]);
                let (m2, b2) = w2.merged(&coeff[..t]);
                let rows = batch * tokens;
                let mut hid = linear(&x, rows, d, MatRef::row_major(&m1, d, h).unwrap(), Some(&b1)).unwrap();
                activation_in_place(&mut hid, Activation::QuickGelu);
                linear(&hid, rows, h, MatRef::row_major(&m2, h, d).unwrap(), Some(&b2)).unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("per_sample_materialised", tokens), |b| {
            b.iter(|| {
                for s in 0..batch {
                    let c = &coeff[s * t..(s + 1) * t];
                    let (m1, b1) = w1.merged(c);
                    let (m2, b2) = w2.merged(c);
                    let xs = &x[s * tokens * d..(s + 1) * tokens * d];
                    let mut hid = linear(xs, tokens, d, MatRef::row_major(&m1, d, h).unwrap(), Some(&b1)).unwrap();
                    activation_in_place(&mut hid, Activation::QuickGelu);
                    linear(&hid, tokens, h, MatRef::row_major(&m2, h, d).unwrap(), Some(&b2)).unwrap();
                }
            })
        });
    }
    group.finish();
}

/// One adaptation step's loss and router gradients: ViT-B/32 widths with 8 experts, shortened to 4 layers,
/// 2 tasks × 8 images, per-sample and batch routing, in f32 and (with a bf16 unit) bf16.
fn adapt_step(c: &mut Criterion) {
    use wemoe_engine::autograd::{entropy_loss_and_router_gradients, TaskBatch};
    use wemoe_engine::model::Heads;
    let be = CpuBackend::new();
    let config = VisionConfig { num_hidden_layers: 4, ..VisionConfig::default() };
    let spec = WemoeSpec {
        experts: (0..8).map(|t| format!("task{t}")).collect(),
        router_layers: 2,
        router_activation: RouterActivation::Identity,
        init_lambda: Some(0.3),
    };
    let model = ImageEncoder::random(&be, &config, Some(&spec), 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let heads_path = dir.path().join("heads.safetensors");
    let head =
        |seed: usize| (0..10 * 512).map(|i| (((i + seed) * 7919) % 97) as f32 / 970.0 - 0.05).collect::<Vec<_>>();
    wemoe_engine::output::write_safetensors(
        &heads_path,
        &[
            wemoe_engine::output::NamedTensor { name: "head.a".into(), shape: vec![10, 512], values: head(1) },
            wemoe_engine::output::NamedTensor { name: "head.b".into(), shape: vec![10, 512], values: head(2) },
        ],
    )
    .unwrap();
    let heads = Heads::open(&be, &heads_path).unwrap();
    let classifier = heads.classifier(&model, dir.path()).unwrap();
    let s = config.image_size;
    let pixels = |seed: usize| {
        Tensor::from_vec(&[8, 3, s, s], (0..8 * 3 * s * s).map(|i| (((i + seed) % 255) as f32) / 128.0 - 1.0).collect())
            .unwrap()
    };
    let mut group = c.benchmark_group("adapt_step_b32_4layers_8experts_2x8images");
    group.sample_size(10);
    // --precision bf16 as well (the CPU backend prepares weights alike in both precisions).
    let bf16 = CpuBackend::with_precision(Precision::Bf16).ok();
    let backends = std::iter::once(("", &be)).chain(bf16.as_ref().map(|b| ("_bf16", b)));
    for (suffix, be) in backends {
        for (name, routing) in [("per_sample", Routing::Sample), ("batch", Routing::Batch)] {
            group.bench_function(format!("{name}{suffix}"), |b| {
                b.iter(|| {
                    let tasks = vec![
                        TaskBatch { head: heads.head("a").unwrap(), pixels: pixels(1) },
                        TaskBatch { head: heads.head("b").unwrap(), pixels: pixels(2) },
                    ];
                    entropy_loss_and_router_gradients(be, &model, &classifier, &tasks, routing).unwrap()
                })
            });
        }
    }
    group.finish();
}

fn preprocess(c: &mut Criterion) {
    let clip = Preprocess::clip(224);
    let (h, w) = (375, 500);
    let image: Vec<u8> = (0..h * w * 3).map(|i| ((i * 7 + i / 1500 * 13) % 256) as u8).collect();
    let photos = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let folder = Dataset::open(&photos, &clip, 224).unwrap();
    let mut group = c.benchmark_group("preprocess_224");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rgb_500x375", |b| b.iter(|| clip.apply(&image, h, w, 3).unwrap()));
    group.throughput(Throughput::Elements(folder.len() as u64));
    group.bench_function("fixture_photos_decoded", |b| b.iter(|| folder.batch(0..folder.len()).unwrap()));
    group.finish();
    // Decoding alone, one thread: libjpeg-turbo (with its SIMD when NASM was there at build time) and PNG.
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for file in ["class_0/china_301x217.jpg", "class_0/flower_121x143.png"] {
        let bytes = std::fs::read(photos.join(file)).unwrap();
        let name = file.rsplit('/').next().unwrap();
        group.bench_function(name, |b| b.iter(|| decode_image(&bytes).unwrap()));
    }
    group.finish();
}

fn text_tower_b32(c: &mut Criterion) {
    let be = CpuBackend::new();
    let json = serde_json::json!({"model_type": "clip"});
    let config = TextConfig::from_model_json(&json, std::path::Path::new("config.json")).unwrap();
    let model = ClipText::load(&be, &RandomWeights::new(0), &config).unwrap();
    // 256 prompts of 12 tokens, a TA8 prompt's typical length: start, ten words, end.
    let eos = config.eos_token_id;
    let prompts: Vec<Vec<u32>> = (0..256u32)
        .map(|p| std::iter::once(49406).chain((0..10).map(|i| (p * 7919 + i * 104729) % 49000)).chain([eos]).collect())
        .collect();
    let mut group = c.benchmark_group("text_tower_b32");
    group.sample_size(10);
    group.throughput(Throughput::Elements(prompts.len() as u64));
    group.bench_function("256_prompts_12_tokens", |b| b.iter(|| model.embed(&be, &prompts, &mut |_| {}).unwrap()));
    group.finish();
}

criterion_group!(
    benches,
    gemm,
    vit_b32_forward,
    wemoe_layer,
    wemoe_mlp_formulations,
    adapt_step,
    preprocess,
    text_tower_b32
);
criterion_main!(benches);
