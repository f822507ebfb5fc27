//! CPU benchmarks: the GEMM at the ViT MLP shapes, and the ViT-B/32-shaped forward (random weights,
//! batch 16). `cargo bench --bench cpu`; figures and machine in BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wemoe_engine::config::VisionConfig;
use wemoe_engine::device::CpuBackend;
use wemoe_engine::model::{ImageEncoder, Routing};
use wemoe_engine::ops::gemm::{matmul, MatRef, Threads};
use wemoe_engine::tensor::Tensor;

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
    }
    group.finish();
}

fn vit_b32_forward(c: &mut Criterion) {
    let be = CpuBackend::new();
    let config = VisionConfig::default();
    let model = ImageEncoder::random(&be, &config, 0).unwrap();
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

criterion_group!(benches, gemm, vit_b32_forward);
criterion_main!(benches);
