//! `WEMOE_OP_TIMES`' products: every backend operation that multiplies matrices records its products'
//! floating-point operations (two per multiply-add, from its shapes), which the table turns into rates; and the
//! CUDA backend, over the host emulation, records the same work as the CPU backend for the same adaptation step
//! and the same forward (whose fused operations are other rows with the same products). One test, since the
//! switch and the table are the process's.

mod common;

use common::*;
use wemoe_engine::autograd::entropy_loss_and_router_gradients;
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::cuda::HostExecutor;
use wemoe_engine::device::{op_times, Backend, CpuBackend, CudaBackend, Device};
use wemoe_engine::model::{Heads, ImageEncoder, Routing};
use wemoe_engine::tensor::Tensor;

/// A host tensor of small values (weights to prepare).
fn values(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product::<usize>();
    let values = (0..n).map(|i| (((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
    Tensor::from_vec(shape, values).unwrap()
}

/// The same on the backend's device.
fn tensor(be: &dyn Backend, shape: &[usize], seed: u64) -> Tensor {
    be.upload(values(shape, seed)).unwrap()
}

/// Each product on odd shapes once, against its count worked out by hand.
fn each_product_counts_its_flops(be: &dyn Backend) {
    op_times::take_rows();
    // 3 groups of 5 rows, 7 inputs, 11 outputs: 2·15·7·11 = 2310 per product.
    let x = tensor(be, &[3, 5, 7], 1);
    let w = be.prepare_linear(values(&[11, 7], 2)).unwrap();
    let b = tensor(be, &[11], 3);
    let y = be.linear(&x, &w, Some(&b)).unwrap();
    be.linear_backward_input(&y, &w).unwrap();
    be.linear_backward_weight(&x, &y).unwrap();
    let experts = be
        .prepare_expert_linear(
            values(&[11, 7], 4),
            values(&[11], 5),
            (0..3).map(|t| values(&[11, 7], 6 + t)).collect(),
            (0..3).map(|t| values(&[11], 9 + t)).collect(),
        )
        .unwrap();
    let c = tensor(be, &[3, 3], 12);
    let ye = be.expert_linear(&x, &c, &experts).unwrap();
    be.expert_linear_backward(&x, &c, &experts, &ye, true).unwrap();
    // Without the input gradient, only xᵀ·dy: 2310 more.
    let (dx, _) = be.expert_linear_backward(&x, &c, &experts, &ye, false).unwrap();
    assert!(dx.is_none(), "{}: an input gradient nobody asked for", be.describe());
    // Attention over 2 samples of 5 tokens, 6 wide in 2 heads: Q·Kᵀ and P·V, 2·(2·2·5·6·5) = 1200; the
    // backward's five products 3000.
    let (q, k, v) = (tensor(be, &[2, 5, 6], 13), tensor(be, &[2, 5, 6], 14), tensor(be, &[2, 5, 6], 15));
    let a = be.attention(&q, &k, &v, 2).unwrap();
    be.attention_backward(&q, &k, &v, &a, 2).unwrap();
    // 2 images of 3 × 8 × 8 in 4 × 4 patches, 4 wide: 8 patches of 48 values, 2·8·48·4 = 3072.
    let pixels = tensor(be, &[2, 3, 8, 8], 16);
    let tokens = be
        .patch_embed(&pixels, &tensor(be, &[4, 3, 4, 4], 17), &tensor(be, &[4], 18), &tensor(be, &[5, 4], 19))
        .unwrap();
    be.patch_embed_backward(&pixels, &[4, 3, 4, 4], &tokens).unwrap();
    let want = [
        ("linear", 1, 2310.0),
        ("linear_backward_input", 1, 2310.0),
        ("linear_backward_weight", 1, 2310.0),
        ("expert_linear", 1, 2310.0),
        ("expert_linear_backward", 2, 6930.0),
        ("attention", 1, 1200.0),
        ("attention_backward", 1, 3000.0),
        ("patch_embed", 1, 3072.0),
        ("patch_embed_backward", 1, 3072.0),
    ];
    let rows = op_times::take_rows();
    for (name, calls, flops) in want {
        let row =
            rows.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{}: no {name} in {rows:?}", be.describe()));
        assert_eq!((row.calls, row.flops), (calls, flops), "{}: {name}", be.describe());
    }
    for row in rows.iter().filter(|r| !want.iter().any(|(name, _, _)| *name == r.name)) {
        assert_eq!(row.flops, 0.0, "{}: {} multiplies no matrices", be.describe(), row.name);
    }
}

/// The fixtures' WEMoE model (router depth 2) on `be`, and the adaptation fixtures' heads.
fn wemoe_model(be: &dyn Backend) -> (ModelDir, ImageEncoder, Heads) {
    let dir = ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap();
    let model = ImageEncoder::load(be, &dir).unwrap();
    let heads = Heads::open(be, &fixture("adapt/heads.safetensors")).unwrap();
    (dir, model, heads)
}

/// The products of each operation while `work` runs, by name.
fn products_of(work: impl FnOnce()) -> Vec<(&'static str, f64)> {
    op_times::take_rows();
    work();
    let mut products: Vec<(&'static str, f64)> =
        op_times::take_rows().into_iter().filter(|r| r.flops > 0.0).map(|r| (r.name, r.flops)).collect();
    products.sort_by_key(|p| p.0);
    products
}

/// One adaptation step of the two tasks, forward and backward.
fn step_products(be: &dyn Backend, routing: Routing) -> Vec<(&'static str, f64)> {
    let (dir, model, heads) = wemoe_model(be);
    let classifier = heads.classifier(&model, &dir.path).unwrap();
    let mut tasks = adapt_tasks(&heads);
    for t in &mut tasks {
        t.pixels = be.upload(std::mem::replace(&mut t.pixels, Tensor::zeros(&[0]))).unwrap();
    }
    products_of(|| {
        entropy_loss_and_router_gradients(be, &model, &classifier, &tasks, routing).unwrap();
    })
}

/// The forward alone (`embed`'s and `eval`'s).
fn forward_products(be: &dyn Backend, routing: Routing) -> Vec<(&'static str, f64)> {
    let (_, model, heads) = wemoe_model(be);
    let pixels = be.upload(adapt_tasks(&heads).swap_remove(0).pixels).unwrap();
    products_of(|| {
        model.encode(be, &pixels, routing).unwrap();
    })
}

#[test]
fn products_count_their_flops_and_both_backends_count_the_same_work() {
    // Before any operation runs: the switch is read once per process.
    unsafe { std::env::set_var(op_times::ENV, "1") };
    let cpu = CpuBackend::new();
    let cuda = CudaBackend::new(HostExecutor, Device::Cuda(0));
    each_product_counts_its_flops(&cpu);
    each_product_counts_its_flops(&cuda);
    let total = |p: &[(&str, f64)]| p.iter().map(|(_, f)| f).sum::<f64>();
    let of = |p: &[(&str, f64)], name: &str| p.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, f)| *f);
    // The first WEMoE layer's input (layer 0's) depends on no router: its fc1's backward has no input gradient.
    let (dir, _, heads) = wemoe_model(&cpu);
    let images: usize = adapt_tasks(&heads).iter().map(|t| t.pixels.shape()[0]).sum();
    let c = &dir.config;
    let first_fc1 = 2.0 * (images * c.tokens() * c.hidden_size * c.intermediate_size) as f64;
    for routing in [Routing::Sample, Routing::Batch] {
        let (on_cpu, on_cuda) = (step_products(&cpu, routing), step_products(&cuda, routing));
        println!("{routing:?} step: CPU {on_cpu:?}\n{routing:?} step: CUDA {on_cuda:?}");
        assert_eq!(on_cpu, on_cuda, "{routing:?}: the backends count different work in a step");
        for name in ["expert_linear", "expert_linear_backward", "attention_backward", "linear_backward_weight"] {
            assert!(on_cpu.iter().any(|(n, f)| *n == name && *f > 0.0), "{routing:?}: a step runs {name}");
        }
        let (forward, backward) = (of(&on_cpu, "expert_linear"), of(&on_cpu, "expert_linear_backward"));
        assert_eq!(backward, 2.0 * forward - first_fc1, "{routing:?}: the WEMoE layers' backward");
        // The CUDA backend's forward fuses the routers' last layer with their reduction (`router_head`) and
        // the MLP's first layer with its activation where it can (`linear_act`): other rows, the same products.
        let (on_cpu, on_cuda) = (forward_products(&cpu, routing), forward_products(&cuda, routing));
        println!("{routing:?} forward: CPU {on_cpu:?}\n{routing:?} forward: CUDA {on_cuda:?}");
        assert!(total(&on_cpu) > 0.0);
        assert_eq!(total(&on_cpu), total(&on_cuda), "{routing:?}: the backends count different work in a forward");
    }
}
