//! GPU benchmarks of the WEMoE MLP formulations (DESIGN.md section 8): CUDA events around each variant,
//! warm-up first, the median of repeated runs, and the fraction of the dense cuBLAS SGEMMs of the same MLP
//! on the same card in the same run. Without a GPU it says so and exits.
//!
//! `cargo bench --bench gpu` (or the prebuilt binary with `--bench`; `tools/gpu-check.sh` runs it).

use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};
use wemoe_engine::config::VisionConfig;
use wemoe_engine::cuda::ops::{self, ExpertWeights, ForwardKernel, InputGradientKernel, MmaOperands};
use wemoe_engine::cuda::{Executor, GpuExecutor};
use wemoe_engine::device::{Activation, WemoeKernels};
use wemoe_engine::rng::Rng;

const WARMUP: usize = 3;
const REPEATS: usize = 15;

fn median_ms(gpu: &GpuExecutor, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUP {
        work()?;
    }
    gpu.synchronize()?;
    let mut times: Vec<f64> = (0..REPEATS).map(|_| gpu.time_ms(&mut work).map(|t| t as f64)).collect::<Result<_>>()?;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(times[REPEATS / 2])
}

/// Row-major `y[rows, out] = x[rows, in] · w[out, in]ᵀ` with cuBLAS (column-major: yᵀ = w · xᵀ).
fn sgemm_xwt(
    blas: &CudaBlas,
    x: &cudarc::driver::CudaView<f32>,
    w: &CudaSlice<f32>,
    y: &mut cudarc::driver::CudaViewMut<f32>,
    rows: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: out as i32,
        n: rows as i32,
        k: inp as i32,
        alpha: 1.0f32,
        lda: inp as i32,
        ldb: inp as i32,
        beta: 0.0f32,
        ldc: out as i32,
    };
    // SAFETY: the buffers hold the extents the configuration names.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| anyhow!("cuBLAS SGEMM: {e:?}"))
}

struct Mlp {
    w1: CudaSlice<f32>,
    b1: CudaSlice<f32>,
    t1: CudaSlice<f32>,
    tb1: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    b2: CudaSlice<f32>,
    t2: CudaSlice<f32>,
    tb2: CudaSlice<f32>,
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    // The whole-model run on the host emulation at a tiny size: proves this program's own code path on a
    // machine without a GPU (its timings mean nothing).
    if std::env::args().any(|a| a == "--emulated") {
        let tiny = VisionConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 32,
            patch_size: 16,
            projection_dim: 16,
            ..VisionConfig::default()
        };
        end_to_end(wemoe_engine::cuda::HostExecutor, &tiny, (2, 1), true)?;
        return adamerging_step(wemoe_engine::cuda::HostExecutor, &tiny, 1, true);
    }
    let gpu = match GpuExecutor::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("gpu benchmarks: no GPU ({e:#}); nothing measured");
            return Ok(());
        }
    };
    // Only the whole model, then where its time went (tools/gpu-check.sh runs this with WEMOE_OP_TIMES=1,
    // which makes every backend operation wait for the GPU: the main run leaves it unset).
    if std::env::args().any(|a| a == "--end-to-end-only") {
        end_to_end(gpu, &VisionConfig::default(), (64, 16), true)?;
        return adamerging_step(GpuExecutor::new(0)?, &VisionConfig::default(), 16, true);
    }
    let stream: Arc<CudaStream> = gpu.stream().clone();
    let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
    // A second handle allowed to use TF32 tensor cores: the reference for --precision tf32.
    let blas_tf32 = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
    // SAFETY: a live handle; setting its math mode has no other effect.
    let rc = unsafe {
        cudarc::cublas::sys::cublasSetMathMode(
            *blas_tf32.handle(),
            cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        )
    };
    anyhow::ensure!(rc == cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS, "cublasSetMathMode: {rc:?}");
    let (d, h, experts) = (768usize, 3072usize, 8usize);
    let mut rng = Rng::new(7);
    let host: Vec<Vec<f32>> = [(h * d, 0.02), (h, 0.02), (experts * h * d, 0.002), (experts * h, 0.002)]
        .iter()
        .chain(&[(d * h, 0.02), (d, 0.02), (experts * d * h, 0.002), (experts * d, 0.002)])
        .map(|&(n, std)| rng.normal_vec(n, 0.0, std))
        .collect();
    let m = Mlp {
        w1: gpu.upload(&host[0])?,
        b1: gpu.upload(&host[1])?,
        t1: gpu.upload(&host[2])?,
        tb1: gpu.upload(&host[3])?,
        w2: gpu.upload(&host[4])?,
        b2: gpu.upload(&host[5])?,
        t2: gpu.upload(&host[6])?,
        tb2: gpu.upload(&host[7])?,
    };
    let mut up = |n: usize, std: f32| gpu.upload(&rng.normal_vec(n, 0.0, std));
    // The router (depth 2, hidden = 768): Linear(768, 768) + ReLU, then Linear(768, 8).
    let (r1, rb1, r2, rb2) = (up(d * d, 0.02)?, up(d, 0.02)?, up(experts * d, 0.02)?, up(experts, 0.3)?);
    let router1 = ExpertWeights {
        base: &r1,
        base_bias: Some(&rb1),
        tasks: None,
        task_biases: None,
        out_features: d,
        in_features: d,
        experts: 0,
    };
    let fc1 = |experts| ExpertWeights {
        base: &m.w1,
        base_bias: Some(&m.b1),
        tasks: Some(&m.t1),
        task_biases: Some(&m.tb1),
        out_features: h,
        in_features: d,
        experts,
    };
    let fc2 = |experts| ExpertWeights {
        base: &m.w2,
        base_bias: Some(&m.b2),
        tasks: Some(&m.t2),
        task_biases: Some(&m.tb2),
        out_features: d,
        in_features: h,
        experts,
    };
    println!("device: {}", gpu.describe());
    println!(
        "| shape | variant | median ms | TFLOP/s | fraction of dense cuBLAS |\n| --- | --- | ---: | ---: | ---: |"
    );
    let mut spread = Vec::new();
    for &(tokens, batch) in &[(50usize, 16usize), (50, 64), (197, 16), (197, 64)] {
        let rows = tokens * batch;
        let flops = 2.0 * 2.0 * (rows * d * h) as f64;
        let x = up(rows * d, 1.0)?;
        let coeff = up(batch * experts, 0.3)?;
        let coeff1 = up(experts, 0.3)?;
        let mut hid = gpu.zeros(rows * h)?;
        let mut y = gpu.zeros(rows * d)?;
        let pre = gpu.zeros(rows * h)?;
        let (mw1, mw2) = (gpu.zeros(h * d)?, gpu.zeros(d * h)?);
        let shape = format!("B={batch} N={tokens}");
        let mut staged_best = f64::INFINITY;

        let dense_cublas = median_ms(&gpu, || {
            sgemm_xwt(&blas, &x.as_view(), &m.w1, &mut hid.as_view_mut(), rows, d, h)?;
            sgemm_xwt(&blas, &hid.as_view(), &m.w2, &mut y.as_view_mut(), rows, h, d)
        })?;
        let row = |variant: &str, ms: f64| {
            println!("| {shape} | {variant} | {ms:.3} | {:.1} | {:.2} |", flops / ms / 1e9, dense_cublas / ms);
        };
        row("dense MLP, cuBLAS SGEMM (GEMMs only)", dense_cublas);
        let dense_ours = median_ms(&gpu, || mlp(&gpu, (&fc1(0), &fc2(0)), (&x, &hid, &y), (1, rows), None, None))?;
        row("dense MLP, our kernel (bias, quick_gelu fused)", dense_ours);
        let moe = (&fc1(experts), &fc2(experts));
        let fused = median_ms(&gpu, || mlp(&gpu, moe, (&x, &hid, &y), (batch, tokens), Some(&coeff), Some(&pre)))?;
        row("WEMoE per-sample, fused (merge on chip)", fused);
        // Kept for the CPU check below, before later variants overwrite y, x and the coefficients' use.
        let fused_out = gpu.download(&y)?;
        let (x_host, coeff_host) = (gpu.download(&x)?, gpu.download(&coeff)?);
        for (operands, label) in [(MmaOperands::Tf32, "TF32"), (MmaOperands::Bf16, "bf16")] {
            let fused_mma = median_ms(&gpu, || {
                let act = Some(Activation::QuickGelu);
                ops::expert_linear_forward_mma(
                    &gpu,
                    operands,
                    &x,
                    batch,
                    tokens,
                    &fc1(experts),
                    Some(&coeff),
                    act,
                    &hid,
                )?;
                ops::expert_linear_forward_mma(
                    &gpu,
                    operands,
                    &hid,
                    batch,
                    tokens,
                    &fc2(experts),
                    Some(&coeff),
                    None,
                    &y,
                )
            })?;
            row(&format!("WEMoE per-sample, fused, {label} tensor cores"), fused_mma);
            let dense_mma = median_ms(&gpu, || {
                let act = Some(Activation::QuickGelu);
                ops::expert_linear_forward_mma(&gpu, operands, &x, 1, rows, &fc1(0), None, act, &hid)?;
                ops::expert_linear_forward_mma(&gpu, operands, &hid, 1, rows, &fc2(0), None, None, &y)
            })?;
            row(&format!("dense MLP, our {label} kernel"), dense_mma);
        }
        let cublas_tf32 = median_ms(&gpu, || {
            sgemm_xwt(&blas_tf32, &x.as_view(), &m.w1, &mut hid.as_view_mut(), rows, d, h)?;
            sgemm_xwt(&blas_tf32, &hid.as_view(), &m.w2, &mut y.as_view_mut(), rows, h, d)
        })?;
        row("dense MLP, cuBLAS with TF32 tensor cores (GEMMs only)", cublas_tf32);
        // The other candidates the backend times per shape (the plain kernel's row is "fused" above).
        for kernel in ForwardKernel::CANDIDATES.into_iter().filter(|k| *k != ForwardKernel::Direct) {
            let ms = median_ms(&gpu, || {
                let act = Some(Activation::QuickGelu);
                let (w1, w2, c) = (fc1(experts), fc2(experts), Some(&coeff));
                ops::expert_linear_forward_by(&gpu, kernel, &x, batch, tokens, &w1, c, act, None, &hid)?;
                ops::expert_linear_forward_by(&gpu, kernel, &hid, batch, tokens, &w2, c, None, None, &y)
            })?;
            row(&format!("WEMoE per-sample, fused, {}", describe(kernel)), ms);
            if !matches!(kernel, ForwardKernel::Grouped(_)) {
                staged_best = staged_best.min(ms);
            }
        }
        for kernel in [ForwardKernel::Staged(1), ForwardKernel::Wide] {
            let ms = median_ms(&gpu, || {
                let act = Some(Activation::QuickGelu);
                ops::expert_linear_forward_by(&gpu, kernel, &x, 1, rows, &fc1(0), None, act, None, &hid)?;
                ops::expert_linear_forward_by(&gpu, kernel, &hid, 1, rows, &fc2(0), None, None, None, &y)
            })?;
            row(&format!("dense MLP, our kernel, {}", describe(kernel)), ms);
        }
        let router_hidden = gpu.zeros(rows * d)?;
        let routed = gpu.zeros(batch * experts)?;
        let router = (&router1, &r2, &rb2);
        let layer = median_ms(&gpu, || {
            route(&gpu, router, &x, &router_hidden, &routed, (batch, tokens))?;
            mlp(&gpu, moe, (&x, &hid, &y), (batch, tokens), Some(&routed), None)
        })?;
        row("WEMoE layer per-sample (router + fused MLP)", layer);

        let batch_fused = median_ms(&gpu, || mlp(&gpu, moe, (&x, &hid, &y), (1, rows), Some(&coeff1), None))?;
        row("WEMoE batch-reduced, fused", batch_fused);
        let batch_layer = median_ms(&gpu, || {
            route(&gpu, router, &x, &router_hidden, &routed, (batch, tokens))?;
            ops::group_mean(&gpu, &routed, batch, batch, experts, &coeff1)?;
            mlp(&gpu, moe, (&x, &hid, &y), (1, rows), Some(&coeff1), None)
        })?;
        row("WEMoE layer batch-reduced (router + fused MLP)", batch_layer);
        let batch_merged = median_ms(&gpu, || {
            ops::merge_experts(&gpu, &m.w1, &m.t1, &coeff1, h * d, experts, &mw1)?;
            ops::merge_experts(&gpu, &m.w2, &m.t2, &coeff1, d * h, experts, &mw2)?;
            let w1 = ExpertWeights {
                base: &mw1,
                base_bias: Some(&m.b1),
                tasks: None,
                task_biases: None,
                out_features: h,
                in_features: d,
                experts: 0,
            };
            let w2 = ExpertWeights {
                base: &mw2,
                base_bias: Some(&m.b2),
                tasks: None,
                task_biases: None,
                out_features: d,
                in_features: h,
                experts: 0,
            };
            mlp(&gpu, (&w1, &w2), (&x, &hid, &y), (1, rows), None, None)
        })?;
        row("WEMoE batch-reduced, merge then dense", batch_merged);
        let batch_cublas = median_ms(&gpu, || {
            ops::merge_experts(&gpu, &m.w1, &m.t1, &coeff1, h * d, experts, &mw1)?;
            ops::merge_experts(&gpu, &m.w2, &m.t2, &coeff1, d * h, experts, &mw2)?;
            sgemm_xwt(&blas, &x.as_view(), &mw1, &mut hid.as_view_mut(), rows, d, h)?;
            sgemm_xwt(&blas, &hid.as_view(), &mw2, &mut y.as_view_mut(), rows, h, d)
        })?;
        row("WEMoE batch-reduced, merge then cuBLAS (GEMMs only)", batch_cublas);
        // Per sample: materialise W_b, then cuBLAS on the sample's rows (what a framework loop does).
        let coeffs_host = gpu.download(&coeff)?;
        let per_sample_coeff: Vec<CudaSlice<f32>> =
            coeffs_host.chunks(experts).map(|c| gpu.upload(c)).collect::<Result<_>>()?;
        let materialise = median_ms(&gpu, || {
            for (b, c) in per_sample_coeff.iter().enumerate() {
                ops::merge_experts(&gpu, &m.w1, &m.t1, c, h * d, experts, &mw1)?;
                ops::merge_experts(&gpu, &m.w2, &m.t2, c, d * h, experts, &mw2)?;
                let (r0, r1) = (b * tokens, (b + 1) * tokens);
                sgemm_xwt(&blas, &x.slice(r0 * d..r1 * d), &mw1, &mut hid.slice_mut(r0 * h..r1 * h), tokens, d, h)?;
                sgemm_xwt(&blas, &hid.slice(r0 * h..r1 * h), &mw2, &mut y.slice_mut(r0 * d..r1 * d), tokens, h, d)?;
            }
            Ok(())
        })?;
        row("WEMoE per-sample, materialise W_b then cuBLAS (GEMMs only)", materialise);
        for (kernel, label) in [
            (InputGradientKernel::Direct, ""),
            (InputGradientKernel::Staged, ", staged by cp.async"),
            (InputGradientKernel::Wide, ", 64×128 tile, staged"),
        ] {
            let backward = median_ms(&gpu, || {
                ops::expert_linear_backward_input(&gpu, kernel, &y, batch, tokens, &fc2(experts), Some(&coeff), &hid)?;
                ops::expert_linear_backward_input(&gpu, kernel, &hid, batch, tokens, &fc1(experts), Some(&coeff), &x)
            })?;
            row(&format!("WEMoE per-sample backward, input gradient{label}"), backward);
        }
        let dc = gpu.zeros(batch * experts)?;
        let router_grad = median_ms(&gpu, || {
            ops::expert_linear_backward_coeff(&gpu, &hid, &y, batch, tokens, &fc2(experts), &dc)?;
            ops::expert_linear_backward_coeff(&gpu, &x, &pre, batch, tokens, &fc1(experts), &dc)
        })?;
        row("WEMoE per-sample backward, router gradient", router_grad);
        if batch == 16 && tokens == 50 {
            let err = cpu_check(&x_host, &coeff_host, &fused_out, &host, batch, tokens, d, h)?;
            println!("| {shape} | fused per-sample output against the CPU engine: max rel. error {err:.2e} | | | |");
        }
        let staged = staged_best / dense_cublas;
        spread.push((shape.clone(), fused / dense_ours, fused / dense_cublas, materialise / fused, staged));
    }
    end_to_end(gpu, &VisionConfig::default(), (64, 16), false)?;
    adamerging_step(GpuExecutor::new(0)?, &VisionConfig::default(), 16, false)?;
    println!();
    for (shape, vs_ours, vs_cublas, materialise, staged) in &spread {
        println!(
            "{shape}: fused per-sample / dense (ours) = {vs_ours:.2}×, / dense cuBLAS = {vs_cublas:.2}×; materialise-then-cuBLAS / fused = {materialise:.2}×; best staged or wide / dense cuBLAS = {staged:.2}×"
        );
    }
    Ok(())
}

type Weights<'a> = ExpertWeights<'a, CudaSlice<f32>>;

/// A candidate kernel in words, for the table.
fn describe(kernel: ForwardKernel) -> String {
    match kernel {
        ForwardKernel::Direct => "sources loaded as merged".into(),
        ForwardKernel::Grouped(n) => format!("{n} routes per block"),
        ForwardKernel::Staged(n) => format!("sources staged by cp.async, {n} route(s) per block"),
        ForwardKernel::Wide => "64×128 tile read as float4, sources staged".into(),
    }
}

/// The MLP `y = fc2(quick_gelu(fc1(x)))` with the hidden layer in `hid`, over `routes` × `per_route` rows
/// (coefficients `coeff` `[routes, T]` for WEMoE layers), the pre-activation into `pre` when given.
fn mlp(
    gpu: &GpuExecutor,
    (fc1, fc2): (&Weights, &Weights),
    (x, hid, y): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
    (routes, per_route): (usize, usize),
    coeff: Option<&CudaSlice<f32>>,
    pre: Option<&CudaSlice<f32>>,
) -> Result<()> {
    ops::expert_linear_forward(gpu, x, routes, per_route, fc1, coeff, Some(Activation::QuickGelu), pre, hid)?;
    ops::expert_linear_forward(gpu, hid, routes, per_route, fc2, coeff, None, None, y)
}

/// The depth-2 router of `x` `[batch·tokens, D]`: Linear with ReLU into `hidden`, then the fused head (last
/// layer, identity, token mean) into `routed` `[batch, T]`.
fn route(
    gpu: &GpuExecutor,
    (fc1, w2, b2): (&Weights, &CudaSlice<f32>, &CudaSlice<f32>),
    x: &CudaSlice<f32>,
    hidden: &CudaSlice<f32>,
    routed: &CudaSlice<f32>,
    (batch, tokens): (usize, usize),
) -> Result<()> {
    let rows = batch * tokens;
    ops::expert_linear_forward(gpu, x, 1, rows, fc1, None, Some(Activation::Relu), None, hidden)?;
    let experts = gpu.len(b2);
    ops::router_head_forward(gpu, hidden, w2, b2, batch, tokens, fc1.out_features, experts, false, None, routed)
}

/// The same WEMoE MLP on the CPU engine: max |gpu − cpu| / max |cpu|.
#[allow(clippy::too_many_arguments)]
fn cpu_check(
    x: &[f32],
    coeff: &[f32],
    gpu_out: &[f32],
    host: &[Vec<f32>],
    batch: usize,
    tokens: usize,
    d: usize,
    h: usize,
) -> Result<f64> {
    use wemoe_engine::ops::activation::activation_in_place;
    use wemoe_engine::ops::expert_linear::{expert_linear, to_blocked, ExpertLinearRef};
    let layer = |w: &[f32], b: &[f32], t: &[f32], tb: &[f32], out: usize, inp: usize| {
        let base = to_blocked(w, out, inp);
        let tasks: Vec<Vec<f32>> = t.chunks(out * inp).map(|t| to_blocked(t, out, inp)).collect();
        (base, b.to_vec(), tasks, tb.to_vec())
    };
    let l1 = layer(&host[0], &host[1], &host[2], &host[3], h, d);
    let l2 = layer(&host[4], &host[5], &host[6], &host[7], d, h);
    type HostLayer = (Vec<f32>, Vec<f32>, Vec<Vec<f32>>, Vec<f32>);
    fn as_ref(l: &HostLayer, out: usize, inp: usize) -> ExpertLinearRef<'_> {
        ExpertLinearRef {
            base_weight: &l.0,
            base_bias: &l.1,
            task_weights: l.2.iter().map(|t| t.as_slice()).collect(),
            task_biases: l.3.chunks(out).collect(),
            out_features: out,
            in_features: inp,
        }
    }
    let mut hid = expert_linear(x, batch, tokens, coeff, &as_ref(&l1, h, d))?;
    activation_in_place(&mut hid, Activation::QuickGelu);
    let y = expert_linear(&hid, batch, tokens, coeff, &as_ref(&l2, d, h))?;
    let diff = y.iter().zip(gpu_out).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let scale = y.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    if gpu_out.iter().any(|v| !v.is_finite()) {
        return Ok(f64::INFINITY);
    }
    Ok(diff / scale)
}

/// Wall-clock seconds of `work` (which ends by copying a result to the host, so it waits for the GPU): one
/// warm-up run, then the median of three.
/// The whole model's f32 paths on the CUDA backend: (label, plain dense products on cuBLAS, the per-sample
/// WEMoE kernels). The first is the backend's default, which times each shape's candidate kernels (the
/// choices are printed).
const END_TO_END: [(&str, bool, WemoeKernels); 3] = [
    ("dense products on cuBLAS, WEMoE kernels tuned per shape", true, WemoeKernels::Tuned),
    ("dense on cuBLAS, WEMoE sources staged by cp.async", true, WemoeKernels::Staged),
    ("the engine's own kernels only, sources loaded as merged", false, WemoeKernels::Direct),
];

fn median_wall_s(mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    work()?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        work()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

/// The whole model on the CUDA backend: a WEMoE model of `config` with 8 experts (random weights; ViT-B/32
/// on a card), the forward of `images` images in both routing modes, and one adaptation step of 8 tasks ×
/// `per_task` images (64 and 16 on a card: the 1000-step budget is 2 minutes on an H100), for each
/// of the backend's f32 paths (`END_TO_END`). Wall clock around work that ends in a copy to the host (which
/// waits for the GPU); medians. With `op_tables`, each path's backend operations are tabulated after it
/// (WEMOE_OP_TIMES).
fn end_to_end<E>(executor: E, config: &VisionConfig, (images, per_task): (usize, usize), op_tables: bool) -> Result<()>
where
    E: Executor + Send + Sync,
    E::Buffer: Send + Sync + 'static,
{
    use wemoe_engine::autograd::{entropy_loss_and_router_gradients, TaskBatch};
    use wemoe_engine::device::{op_times, Backend, CudaBackend, Device};
    use wemoe_engine::model::{Heads, ImageEncoder, RouterActivation, Routing, WemoeSpec};
    use wemoe_engine::tensor::Tensor;

    // The model, heads and inputs are made once (drawing the random weights takes the host seconds) and
    // shared by the paths: a backend is rebuilt around the same executor, whose buffers they live in.
    let setup = CudaBackend::new(executor, Device::Cuda(0));
    let spec = WemoeSpec {
        experts: (0..8).map(|t| format!("task{t}")).collect(),
        router_layers: 2,
        router_activation: RouterActivation::Identity,
        init_lambda: Some(0.3),
    };
    let model = ImageEncoder::random(&setup, config, Some(&spec), 3)?;
    let s = config.image_size;
    let pixels = |n: usize, seed: usize| -> Result<Tensor> {
        let v = (0..n * 3 * s * s).map(|i| (((i * 31 + seed) % 255) as f32) / 128.0 - 1.0).collect();
        setup.upload(Tensor::from_vec(&[n, 3, s, s], v)?)
    };
    let batch = images;
    let images = pixels(batch, 1)?;
    let dir = tempfile::tempdir()?;
    let heads_path = dir.path().join("heads.safetensors");
    write_heads(&heads_path, config)?;
    let heads = Heads::open(&setup, &heads_path)?;
    let classifier = heads.classifier(&model, dir.path())?;
    let tasks: Vec<TaskBatch> = (0..8)
        .map(|t| -> Result<TaskBatch> {
            Ok(TaskBatch { head: heads.head(&format!("task{t}"))?, pixels: pixels(per_task, 100 + t)? })
        })
        .collect::<Result<_>>()?;
    let mut executor = setup.into_executor();
    op_times::take_report(); // the uploads above are not any path's
    for (label, vendor, kernels) in END_TO_END {
        let be = CudaBackend::new(executor, Device::Cuda(0)).with_vendor_products(vendor).with_wemoe_kernels(kernels);
        println!(
            "\n| end to end ({} WEMoE, 8 experts, {} layers, {label}) | routing | median | rate |\n| --- | --- | ---: | ---: |",
            if config.hidden_size == 768 { "ViT-B/32" } else { "a small" },
            config.num_hidden_layers
        );
        for (name, routing) in [("per-sample", Routing::Sample), ("batch", Routing::Batch)] {
            let t = median_wall_s(|| {
                let out = model.encode(&be, &images, routing)?;
                be.to_host(&out.pooled).map(drop)
            })?;
            println!("| forward, {batch} images | {name} | {:.1} ms | {:.0} images/s |", t * 1e3, batch as f64 / t);
        }
        for (name, routing) in [("per-sample", Routing::Sample), ("batch", Routing::Batch)] {
            let t = median_wall_s(|| {
                let (loss, grads) = entropy_loss_and_router_gradients(&be, &model, &classifier, &tasks, routing)?;
                for g in grads.values() {
                    be.to_host(g)?;
                }
                anyhow::ensure!(loss.is_finite(), "non-finite loss");
                Ok(())
            })?;
            println!(
                "| adaptation step, 8 tasks × {per_task} images | {name} | {:.1} ms | 1000 steps in {:.0} s |",
                t * 1e3,
                t * 1e3
            );
        }
        let (forward, input) = be.kernel_choices();
        for c in &forward {
            println!("tuned WEMoE forward, {c}");
        }
        for c in &input {
            println!("tuned WEMoE input gradient, {c}");
        }
        if op_tables {
            if let Some(table) = op_times::take_report() {
                println!("\n{label}:\n{table}");
            }
        }
        executor = be.into_executor();
    }
    Ok(())
}

/// A parameter tensor's shape in a CLIP vision tower of `config`, by its name (those of
/// `merge::parameter_order`).
fn parameter_shape(name: &str, c: &VisionConfig) -> Vec<usize> {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    if name.ends_with("patch_embedding.weight") {
        vec![d, c.num_channels, c.patch_size, c.patch_size]
    } else if name.ends_with("position_embedding.weight") {
        vec![(c.image_size / c.patch_size).pow(2) + 1, d]
    } else if name.ends_with("fc1.weight") {
        vec![i, d]
    } else if name.ends_with("fc1.bias") {
        vec![i]
    } else if name.ends_with("fc2.weight") {
        vec![d, i]
    } else if name.ends_with("proj.weight") {
        vec![d, d]
    } else {
        vec![d] // the class embedding, the other biases, the LayerNorms
    }
}

/// A seeded random CLIP vision model of `config` with a projection: its tensors.
fn random_clip(config: &VisionConfig, seed: u64) -> Result<Vec<wemoe_engine::output::NamedTensor>> {
    use wemoe_engine::model::{RandomWeights, WeightSource};
    let src = RandomWeights::new(seed);
    let mut names = wemoe_engine::merge::parameter_order(config);
    names.push("visual_projection.weight".into());
    names
        .into_iter()
        .map(|name| {
            let shape = match name.as_str() {
                "visual_projection.weight" => vec![config.projection_dim, config.hidden_size],
                _ => parameter_shape(&name, config),
            };
            let values = src.get(&name, &shape)?.into_host_vec()?;
            Ok(wemoe_engine::output::NamedTensor { name, shape, values })
        })
        .collect()
}

/// `tensors` written to `dir` as a HF CLIP vision checkpoint of `config`.
fn write_clip(
    dir: &std::path::Path,
    config: &VisionConfig,
    tensors: &[wemoe_engine::output::NamedTensor],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut json = config.to_json();
    json["model_type"] = "clip_vision_model".into();
    wemoe_engine::output::write_atomic(&dir.join("config.json"), serde_json::to_string(&json)?.as_bytes())?;
    wemoe_engine::output::write_safetensors(&dir.join("model.safetensors"), tensors)
}

/// One step of layer-wise AdaMerging (`merge --method adamerging`) on the CUDA backend: a random CLIP vision
/// model of `config` and 8 experts made from it written to a temporary folder and held on the device
/// (`AdaMerging::new`), then what the run's loop does per step: the loss and every coefficient's gradient
/// over 8 tasks × `per_task` images, and the model merged anew. Medians of wall clock, as `end_to_end`.
fn adamerging_step<E>(executor: E, config: &VisionConfig, per_task: usize, op_tables: bool) -> Result<()>
where
    E: Executor + Send + Sync,
    E::Buffer: Send + Sync + 'static,
{
    use wemoe_engine::autograd::TaskBatch;
    use wemoe_engine::checkpoint::ModelDir;
    use wemoe_engine::device::{op_times, Backend, CudaBackend, Device};
    use wemoe_engine::merge::{AdaMerging, Expert};
    use wemoe_engine::model::Heads;
    use wemoe_engine::tensor::Tensor;

    let dir = tempfile::tempdir()?;
    let made = std::time::Instant::now();
    // The experts scale the pretrained model (task vectors 0.01·(t + 1)·θ0): a step's work does not depend on
    // the values, and drawing 8 more random B/32 models would spend the card's minutes on the host's RNG.
    let pretrained_tensors = random_clip(config, 3)?;
    write_clip(&dir.path().join("pretrained"), config, &pretrained_tensors)?;
    for t in 0..8 {
        let factor = 1.0 + 0.01 * (t + 1) as f32;
        let scaled: Vec<_> = pretrained_tensors
            .iter()
            .map(|p| wemoe_engine::output::NamedTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                values: p.values.iter().map(|v| v * factor).collect(),
            })
            .collect();
        write_clip(&dir.path().join(format!("expert{t}")), config, &scaled)?;
    }
    let pretrained = ModelDir::open(&dir.path().join("pretrained"))?;
    let experts = (0..8)
        .map(|t| {
            Ok(Expert { name: format!("task{t}"), model: ModelDir::open(&dir.path().join(format!("expert{t}")))? })
        })
        .collect::<Result<Vec<_>>>()?;
    let be = CudaBackend::new(executor, Device::Cuda(0));
    let written = made.elapsed().as_secs_f64();
    let held = std::time::Instant::now();
    let run = AdaMerging::new(&be, &pretrained, &experts)?;
    let held = held.elapsed().as_secs_f64();
    let heads_path = dir.path().join("heads.safetensors");
    write_heads(&heads_path, config)?;
    let heads = Heads::open(&be, &heads_path)?;
    let s = config.image_size;
    let tasks: Vec<TaskBatch> = (0..8)
        .map(|t| -> Result<TaskBatch> {
            let v = (0..per_task * 3 * s * s).map(|i| (((i * 31 + t) % 255) as f32) / 128.0 - 1.0).collect();
            Ok(TaskBatch {
                head: heads.head(&format!("task{t}"))?,
                pixels: be.upload(Tensor::from_vec(&[per_task, 3, s, s], v)?)?,
            })
        })
        .collect::<Result<_>>()?;
    let coefficients = run.initial(0.3);
    let mut model = run.model(&be, &coefficients)?;
    op_times::take_report();
    let t = median_wall_s(|| {
        let (loss, grads) = run.loss_and_gradient(&be, &model, &coefficients, &heads, &tasks)?;
        anyhow::ensure!(loss.is_finite() && grads.len() == run.names().len(), "a non-finite loss or missing gradients");
        model.vision = run.vision(&be, &coefficients)?;
        Ok(())
    })?;
    println!(
        "\n| layer-wise AdaMerging ({}, 8 experts held: models written in {written:.1} s, held in {held:.1} s) | median | rate |\n| --- | ---: | ---: |",
        if config.hidden_size == 768 { "ViT-B/32" } else { "a small model" }
    );
    println!(
        "| step, 8 tasks × {per_task} images, the model merged anew | {:.1} ms | 1000 steps in {:.0} s |",
        t * 1e3,
        t * 1e3
    );
    if op_tables {
        if let Some(table) = op_times::take_report() {
            println!("\nlayer-wise AdaMerging:\n{table}");
        }
    }
    Ok(())
}

/// Zero-shot heads of 10 classes for tasks `task0` … `task7`, fixed values, written to `path`.
fn write_heads(path: &std::path::Path, config: &VisionConfig) -> Result<()> {
    let tensors: Vec<wemoe_engine::output::NamedTensor> = (0..8)
        .map(|t| wemoe_engine::output::NamedTensor {
            name: format!("head.task{t}"),
            shape: vec![10, config.projection_dim],
            values: (0..10 * config.projection_dim).map(|i| (((i + t) * 7919) % 97) as f32 / 970.0 - 0.05).collect(),
        })
        .collect();
    wemoe_engine::output::write_safetensors(path, &tensors)
}
