//! Every CUDA kernel against the CPU reference on small odd shapes (token counts, widths and expert counts
//! that are not multiples of the tiles). The `host` tests run the kernels' own sources in the host
//! emulation (DESIGN.md section 3) in every `cargo test`; the `gpu` tests run the same cases on a GPU
//! (`tools/gpu-check.sh` runs them there with `--ignored`). Outputs are poisoned with NaN before each
//! launch, so an element a kernel fails to write fails the test.

mod common;

use wemoe_engine::adapt::Adam;
use wemoe_engine::cuda::ops::{self, ExpertWeights, ForwardKernel, InputGradientKernel, MmaOperands};
use wemoe_engine::cuda::{with_copy_landing, Arg, CopyLanding, Dims, Executor, GpuExecutor, HostExecutor};
use wemoe_engine::device::Activation;
use wemoe_engine::ops::expert_linear::{self as cpu_expert, expert_linear, to_blocked, ExpertLinearRef};
use wemoe_engine::ops::gemm::{linear, linear_backward_input, linear_backward_weight, MatRef};
use wemoe_engine::ops::patch_embed::PatchGeometry;
use wemoe_engine::ops::{
    activation, attention as cpu_attention, entropy, layer_norm, patch_embed as cpu_patch, router, rows,
    task_vectors as cpu_task_vectors,
};
use wemoe_engine::rng::Rng;

use common::KERNEL_REL_TOL;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, 0.0, scale)
}

/// `[rows, cols]` to `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// max |a − b| / max |b|, and infinite when `got` holds anything non-finite (an unwritten NaN included).
fn error(got: &[f32], want: &[f32]) -> f64 {
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    common::rel_err(got, want)
}

fn poisoned<E: Executor>(e: &E, n: usize) -> E::Buffer {
    e.upload(&vec![f32::NAN; n]).unwrap()
}

/// The largest of several named errors, each printed.
fn worst(kernel: &str, errors: &[(String, f64)]) -> f64 {
    for (what, err) in errors {
        println!("  {kernel} [{what}]: {err:.2e}");
    }
    errors.iter().map(|(_, e)| *e).fold(0.0, f64::max)
}

/// A WEMoE layer's weights in PyTorch's layout, and the CPU reference's blocked view.
struct Layer {
    out: usize,
    inp: usize,
    experts: usize,
    base: Vec<f32>,
    bias: Vec<f32>,
    tasks: Vec<f32>,
    task_biases: Vec<f32>,
    base_blocked: Vec<f32>,
    tasks_blocked: Vec<Vec<f32>>,
}

impl Layer {
    fn new(out: usize, inp: usize, experts: usize, seed: u64) -> Self {
        let base = values(out * inp, seed, 0.2);
        let tasks = values(experts * out * inp, seed + 1, 0.05);
        let tasks_blocked = tasks.chunks(out * inp).map(|t| to_blocked(t, out, inp)).collect();
        Layer {
            out,
            inp,
            experts,
            base_blocked: to_blocked(&base, out, inp),
            base,
            bias: values(out, seed + 2, 0.1),
            tasks,
            task_biases: values(experts * out, seed + 3, 0.05),
            tasks_blocked,
        }
    }

    fn cpu(&self) -> ExpertLinearRef<'_> {
        ExpertLinearRef {
            base_weight: &self.base_blocked,
            base_bias: &self.bias,
            task_weights: self.tasks_blocked.iter().map(|t| t.as_slice()).collect(),
            task_biases: self.task_biases.chunks(self.out).collect(),
            out_features: self.out,
            in_features: self.inp,
        }
    }
}

struct DeviceLayer<B> {
    base: B,
    bias: B,
    tasks: B,
    task_biases: B,
}

impl<B> DeviceLayer<B> {
    fn new<E: Executor<Buffer = B>>(e: &E, l: &Layer) -> Self {
        let up = |v: &[f32]| e.upload(if v.is_empty() { &[0.0] } else { v }).unwrap();
        DeviceLayer { base: up(&l.base), bias: up(&l.bias), tasks: up(&l.tasks), task_biases: up(&l.task_biases) }
    }

    fn weights(&self, l: &Layer) -> ExpertWeights<'_, B> {
        ExpertWeights {
            base: &self.base,
            base_bias: Some(&self.bias),
            tasks: Some(&self.tasks),
            task_biases: Some(&self.task_biases),
            out_features: l.out,
            in_features: l.inp,
            experts: l.experts,
        }
    }
}

fn expert_linear_forward<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    // (routes, rows per route, in, out, experts, activation): per-sample with odd token counts, a route
    // taller than one 64-row tile, batch routing (one route), and a plain linear layer (no experts).
    let cases = [
        (3, 7, 37, 70, 3, Some(Activation::QuickGelu)),
        (2, 67, 65, 33, 5, None),
        (1, 45, 29, 130, 8, Some(Activation::Gelu)),
        (4, 11, 19, 23, 0, Some(Activation::Relu)),
        // ViT-B/32's fc1 with 8 experts, two samples: indexing at the real sizes (fc2 in the backward test).
        (2, 50, 768, 3072, 8, Some(Activation::QuickGelu)),
        // More experts than one pass of 8 (FusionBench's 14- and 20-task benchmarks), and near the kernels' 64.
        (2, 9, 33, 40, 11, Some(Activation::QuickGelu)),
        (2, 5, 20, 24, 63, None),
    ];
    for (i, &(routes, n, inp, out, experts, act)) in cases.iter().enumerate() {
        let l = Layer::new(out, inp, experts, 100 + i as u64);
        let x = values(routes * n * inp, 200 + i as u64, 1.0);
        let coeff = values(routes * experts.max(1), 300 + i as u64, 0.6);
        let coeff = &coeff[..routes * experts];
        let want_pre = if experts > 0 {
            expert_linear(&x, routes, n, coeff, &l.cpu()).unwrap()
        } else {
            linear(&x, routes * n, inp, MatRef::row_major(&l.base, out, inp).unwrap().t(), Some(&l.bias)).unwrap()
        };
        let mut want = want_pre.clone();
        if let Some(a) = act {
            activation::activation_in_place(&mut want, a);
        }
        let d = DeviceLayer::new(e, &l);
        let (xb, cb) = (e.upload(&x).unwrap(), e.upload(if coeff.is_empty() { &[0.0] } else { coeff }).unwrap());
        let (pre, y) = (poisoned(e, routes * n * out), poisoned(e, routes * n * out));
        ops::expert_linear_forward(e, &xb, routes, n, &d.weights(&l), Some(&cb), act, Some(&pre), &y).unwrap();
        let label = format!("{routes}×{n} rows, {inp}→{out}, T={experts}, {act:?}");
        errors.push((format!("{label}: pre"), error(&e.download(&pre).unwrap(), &want_pre)));
        errors.push((format!("{label}: y"), error(&e.download(&y).unwrap(), &want)));
    }
    worst("expert_linear_forward", &errors)
}

fn expert_linear_grouped<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    // Route counts that do not fill the last block; a route taller than one row tile.
    for (i, &(routes, n, inp, out, experts)) in
        [(3, 7, 37, 70, 3), (5, 67, 29, 33, 5), (4, 50, 64, 64, 8), (3, 9, 33, 40, 11)].iter().enumerate()
    {
        let l = Layer::new(out, inp, experts, 800 + i as u64);
        let x = values(routes * n * inp, 810 + i as u64, 1.0);
        let coeff = values(routes * experts, 820 + i as u64, 0.6);
        let mut want = expert_linear(&x, routes, n, &coeff, &l.cpu()).unwrap();
        activation::activation_in_place(&mut want, Activation::QuickGelu);
        let d = DeviceLayer::new(e, &l);
        let (xb, cb) = (e.upload(&x).unwrap(), e.upload(&coeff).unwrap());
        for per_block in [2, 4] {
            let y = poisoned(e, routes * n * out);
            let act = Some(Activation::QuickGelu);
            let kernel = ForwardKernel::Grouped(per_block);
            ops::expert_linear_forward_by(e, kernel, &xb, routes, n, &d.weights(&l), Some(&cb), act, None, &y).unwrap();
            let label = format!("{routes}×{n} rows, {inp}→{out}, T={experts}, {per_block} routes per block");
            errors.push((label, error(&e.download(&y).unwrap(), &want)));
        }
    }
    worst("expert_linear_forward_x2/_x4", &errors)
}

/// The kernels that stage their weight sources by `cp.async` (expert_linear_staged.cu, expert_linear_wide.cu),
/// each under both of the emulation's landings (on a GPU the landing setting does nothing and the cases
/// simply run twice). Shapes: widths that are and are not multiples of 4 (16-byte pieces, or 4-byte copies),
/// a last k-step that is partly past the width, ragged row and column tiles (wider than one 128-column tile
/// too), route counts that leave the last pair half empty, and a plain linear layer.
fn expert_linear_staged<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    let cases = [
        (3, 7, 37, 70, 3, Some(Activation::QuickGelu)),
        (5, 67, 64, 33, 5, None),
        (3, 50, 132, 96, 8, Some(Activation::QuickGelu)),
        (4, 11, 19, 23, 0, Some(Activation::Relu)),
        (1, 20, 40, 12, 0, None),
        (2, 9, 44, 200, 4, Some(Activation::Gelu)),
        (1, 70, 150, 131, 2, None),
        // More sources (12) than the ring stages ahead.
        (3, 9, 36, 40, 11, Some(Activation::QuickGelu)),
    ];
    for landing in [CopyLanding::AtWait, CopyLanding::AtIssue] {
        with_copy_landing(landing, || {
            for (i, &(routes, n, inp, out, experts, act)) in cases.iter().enumerate() {
                let l = Layer::new(out, inp, experts, 900 + i as u64);
                let x = values(routes * n * inp, 910 + i as u64, 1.0);
                let dy = values(routes * n * out, 920 + i as u64, 1.0);
                let coeff = values(routes * experts.max(1), 930 + i as u64, 0.6);
                let coeff = &coeff[..routes * experts];
                let w_t = MatRef::row_major(&l.base, out, inp).unwrap().t();
                let (want_pre, want_dx) = if experts > 0 {
                    let pre = expert_linear(&x, routes, n, coeff, &l.cpu()).unwrap();
                    (
                        pre,
                        cpu_expert::expert_linear_backward(&x, routes, n, coeff, &l.cpu(), &dy, true)
                            .unwrap()
                            .0
                            .unwrap(),
                    )
                } else {
                    let pre = linear(&x, routes * n, inp, w_t, Some(&l.bias)).unwrap();
                    (pre, linear_backward_input(&dy, routes * n, w_t).unwrap())
                };
                let mut want = want_pre.clone();
                if let Some(a) = act {
                    activation::activation_in_place(&mut want, a);
                }
                let d = DeviceLayer::new(e, &l);
                let (xb, dyb) = (e.upload(&x).unwrap(), e.upload(&dy).unwrap());
                let cb = e.upload(if coeff.is_empty() { &[0.0] } else { coeff }).unwrap();
                let label = format!("{landing:?}, {routes}×{n} rows, {inp}→{out}, T={experts}");
                for kernel in [ForwardKernel::Staged(1), ForwardKernel::Staged(2), ForwardKernel::Wide] {
                    let (pre, y) = (poisoned(e, routes * n * out), poisoned(e, routes * n * out));
                    let w = d.weights(&l);
                    ops::expert_linear_forward_by(e, kernel, &xb, routes, n, &w, Some(&cb), act, Some(&pre), &y)
                        .unwrap();
                    errors.push((format!("{label}, {kernel:?}: pre"), error(&e.download(&pre).unwrap(), &want_pre)));
                    errors.push((format!("{label}, {kernel:?}: y"), error(&e.download(&y).unwrap(), &want)));
                }
                for kernel in [InputGradientKernel::Staged, InputGradientKernel::Wide] {
                    let dx = poisoned(e, routes * n * inp);
                    let w = d.weights(&l);
                    ops::expert_linear_backward_input(e, kernel, &dyb, routes, n, &w, Some(&cb), &dx).unwrap();
                    errors.push((format!("{label}, {kernel:?}: dx"), error(&e.download(&dx).unwrap(), &want_dx)));
                }
            }
        });
    }
    worst("expert_linear_forward_staged/_x2/_wide, expert_linear_backward_input_staged/_wide", &errors)
}

/// Every candidate the CUDA backend may choose between, by timing, for a per-sample product gives the same
/// bits as the others: each output is the same chain of fused multiply-adds (the merge from W0 through the
/// experts in order, then the products over the inputs in order), whatever the tile. Were they to differ,
/// which one wins the timing on a card would change a run's results, and `adapt --resume` would not end
/// where an uninterrupted run does. (NVRTC fused the direct kernel's `v += c·τ` merge on its own; the
/// emulation's host compiler did not, until the kernel said `fmaf`.) Returns the largest relative difference
/// (zero).
fn expert_linear_candidates_agree<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    for (i, &(routes, n, inp, out, experts)) in
        [(3, 7, 37, 70, 3), (5, 67, 132, 33, 8), (2, 9, 44, 200, 4), (3, 9, 33, 40, 11)].iter().enumerate()
    {
        let l = Layer::new(out, inp, experts, 1000 + i as u64);
        let x = values(routes * n * inp, 1010 + i as u64, 1.0);
        let dy = values(routes * n * out, 1020 + i as u64, 1.0);
        let coeff = values(routes * experts, 1030 + i as u64, 0.6);
        let d = DeviceLayer::new(e, &l);
        let (xb, dyb, cb) = (e.upload(&x).unwrap(), e.upload(&dy).unwrap(), e.upload(&coeff).unwrap());
        let (w, act) = (d.weights(&l), Some(Activation::QuickGelu));
        let label = format!("{routes}×{n} rows, {inp}→{out}, T={experts}");
        let forward = |kernel| {
            let (pre, y) = (poisoned(e, routes * n * out), poisoned(e, routes * n * out));
            ops::expert_linear_forward_by(e, kernel, &xb, routes, n, &w, Some(&cb), act, Some(&pre), &y).unwrap();
            [e.download(&pre).unwrap(), e.download(&y).unwrap()].concat()
        };
        let first = forward(ForwardKernel::CANDIDATES[0]);
        for &kernel in &ForwardKernel::CANDIDATES[1..] {
            errors.push((
                format!("{label}: {kernel:?} against {:?}", ForwardKernel::CANDIDATES[0]),
                bits_apart(&forward(kernel), &first),
            ));
        }
        let input_gradient = |kernel| {
            let dx = poisoned(e, routes * n * inp);
            ops::expert_linear_backward_input(e, kernel, &dyb, routes, n, &w, Some(&cb), &dx).unwrap();
            e.download(&dx).unwrap()
        };
        let first = input_gradient(InputGradientKernel::CANDIDATES[0]);
        for &kernel in &InputGradientKernel::CANDIDATES[1..] {
            errors.push((
                format!("{label}: {kernel:?} against {:?}", InputGradientKernel::CANDIDATES[0]),
                bits_apart(&input_gradient(kernel), &first),
            ));
        }
    }
    worst("every forward and input-gradient candidate against the first", &errors)
}

/// Zero when `got` and `want` hold the same bits, else their relative error (or 1 where that rounds to zero),
/// so that a difference in the last place fails [`report`]'s bar too.
fn bits_apart(got: &[f32], want: &[f32]) -> f64 {
    let same = got.len() == want.len() && got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
    if same {
        0.0
    } else {
        error(got, want).max(1.0)
    }
}

/// The emulation's own landings are what they claim: a read between a `cp.async` and its wait sees the old
/// value when copies land at the wait and the new one when they land at issue; after the wait, the new one.
/// (Were they not, `expert_linear_staged`'s two runs would prove nothing about the kernels' waits.)
#[test]
fn host_copy_landings_differ_before_the_wait() {
    let e = HostExecutor;
    let n = 45;
    let src: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
    for (landing, before_is_new) in [(CopyLanding::AtWait, false), (CopyLanding::AtIssue, true)] {
        let (before, after) = (poisoned(&e, n), poisoned(&e, n));
        with_copy_landing(landing, || {
            let args = [Arg::Buf(&e.upload(&src).unwrap()), Arg::Buf(&before), Arg::Buf(&after), Arg::I32(n as i32)];
            let dims = Dims { grid: (1, 1, 1), block: (64, 1, 1) };
            e.launch("copy_async_probe", dims, &args).unwrap();
        });
        let want_before = if before_is_new { src.clone() } else { vec![-1.0; n] };
        assert_eq!(e.download(&before).unwrap(), want_before, "{landing:?}: before the wait");
        assert_eq!(e.download(&after).unwrap(), src, "{landing:?}: after the wait");
    }
}

/// An f32 rounded to a tensor-core operand as the kernels' `pack` does: TF32 to nearest with ties away from
/// zero (cvt.rna), bf16 to nearest even (cvt.rn).
fn rounded(v: f32, operands: MmaOperands) -> f32 {
    match operands {
        MmaOperands::Tf32 => f32::from_bits((v.to_bits() + 0x1000) & 0xffff_e000),
        MmaOperands::Bf16 => half::bf16::from_f32(v).to_f32(),
    }
}

/// The tensor-core forward against a reference on the same rounded operands: `x` and each merged weight
/// (formed in f32 by the kernel's chain of fused multiply-adds) rounded to the format, products summed in
/// f64, bias and activation after. What is left between the two is f32 accumulation, so the f32 bar
/// applies. The distance to the unrounded f32 result is printed, and must not be zero (the operands really
/// were rounded).
fn expert_linear_mma<E: Executor>(e: &E, operands: MmaOperands) -> f64 {
    let mut errors = Vec::new();
    for (i, &(routes, n, inp, out, experts)) in
        [(3, 7, 37, 70, 3), (2, 67, 65, 33, 5), (4, 11, 19, 23, 0), (2, 9, 33, 40, 11)].iter().enumerate()
    {
        let l = Layer::new(out, inp, experts, 900 + i as u64);
        let x = values(routes * n * inp, 910 + i as u64, 1.0);
        let coeff = values((routes * experts).max(1), 920 + i as u64, 0.6);
        let coeff = &coeff[..routes * experts];
        let mut want = vec![0.0f32; routes * n * out];
        for r in 0..routes {
            let c = &coeff[r * experts..(r + 1) * experts];
            for o in 0..out {
                let merged: Vec<f32> = (0..inp)
                    .map(|k| {
                        let at = o * inp + k;
                        let w = c
                            .iter()
                            .enumerate()
                            .fold(l.base[at], |v, (t, &ct)| ct.mul_add(l.tasks[t * out * inp + at], v));
                        rounded(w, operands)
                    })
                    .collect();
                let bias =
                    c.iter().enumerate().fold(l.bias[o], |b, (t, &ct)| ct.mul_add(l.task_biases[t * out + o], b));
                for row in r * n..(r + 1) * n {
                    let xr = &x[row * inp..(row + 1) * inp];
                    let z: f64 = xr.iter().zip(&merged).map(|(&a, &w)| rounded(a, operands) as f64 * w as f64).sum();
                    want[row * out + o] = z as f32 + bias;
                }
            }
        }
        activation::activation_in_place(&mut want, Activation::QuickGelu);
        let mut unrounded = if experts > 0 {
            expert_linear(&x, routes, n, coeff, &l.cpu()).unwrap()
        } else {
            linear(&x, routes * n, inp, MatRef::row_major(&l.base, out, inp).unwrap().t(), Some(&l.bias)).unwrap()
        };
        activation::activation_in_place(&mut unrounded, Activation::QuickGelu);
        let d = DeviceLayer::new(e, &l);
        let (xb, cb) = (e.upload(&x).unwrap(), e.upload(if coeff.is_empty() { &[0.0] } else { coeff }).unwrap());
        let y = poisoned(e, routes * n * out);
        let act = Some(Activation::QuickGelu);
        ops::expert_linear_forward_mma(e, operands, &xb, routes, n, &d.weights(&l), Some(&cb), act, &y).unwrap();
        let got = e.download(&y).unwrap();
        let off = error(&got, &unrounded);
        assert!(off > 0.0, "{operands:?}: the result equals the unrounded f32 one; were the operands rounded?");
        errors.push((
            format!("{routes}×{n} rows, {inp}→{out}, T={experts} ({off:.1e} from unrounded f32)"),
            error(&got, &want),
        ));
    }
    worst(&format!("expert_linear_forward ({operands:?} operands)"), &errors)
}

fn expert_linear_tf32<E: Executor>(e: &E) -> f64 {
    expert_linear_mma(e, MmaOperands::Tf32)
}

fn expert_linear_bf16<E: Executor>(e: &E) -> f64 {
    expert_linear_mma(e, MmaOperands::Bf16)
}

fn expert_linear_backward<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    for (i, &(routes, n, inp, out, experts)) in
        // The router gradient sums experts in chunks of 8: 11 crosses into a second, ragged chunk.
        [(3, 7, 37, 70, 3), (2, 67, 65, 33, 5), (1, 45, 29, 130, 8), (1, 50, 3072, 768, 8), (2, 9, 33, 40, 11)]
                .iter()
                .enumerate()
    {
        let l = Layer::new(out, inp, experts, 400 + i as u64);
        let x = values(routes * n * inp, 500 + i as u64, 1.0);
        let dy = values(routes * n * out, 600 + i as u64, 1.0);
        let coeff = values(routes * experts, 700 + i as u64, 0.6);
        let (want_dx, want_dc) =
            cpu_expert::expert_linear_backward(&x, routes, n, &coeff, &l.cpu(), &dy, true).unwrap();
        let want_dx = want_dx.expect("dx asked for");
        let d = DeviceLayer::new(e, &l);
        let (xb, dyb, cb) = (e.upload(&x).unwrap(), e.upload(&dy).unwrap(), e.upload(&coeff).unwrap());
        let (dx, dc) = (poisoned(e, routes * n * inp), poisoned(e, routes * experts));
        ops::expert_linear_backward_input(
            e,
            InputGradientKernel::Direct,
            &dyb,
            routes,
            n,
            &d.weights(&l),
            Some(&cb),
            &dx,
        )
        .unwrap();
        ops::expert_linear_backward_coeff(e, &xb, &dyb, routes, n, &d.weights(&l), &dc).unwrap();
        let label = format!("{routes}×{n} rows, {inp}→{out}, T={experts}");
        errors.push((format!("{label}: dx"), error(&e.download(&dx).unwrap(), &want_dx)));
        errors.push((format!("{label}: dc"), error(&e.download(&dc).unwrap(), &want_dc)));
    }
    worst("expert_linear_backward_input + _coeff", &errors)
}

fn linear_weight_gradient<E: Executor>(e: &E) -> f64 {
    let (rows, inp, out) = (83, 70, 13);
    let x = values(rows * inp, 1, 1.0);
    let dy = values(rows * out, 2, 1.0);
    let (want_dw, want_db) = linear_backward_weight(&x, &dy, rows, inp, out).unwrap();
    let (dw, db) = (poisoned(e, out * inp), poisoned(e, out));
    ops::linear_backward_weight(e, &e.upload(&x).unwrap(), &e.upload(&dy).unwrap(), rows, inp, out, &dw, Some(&db))
        .unwrap();
    worst(
        "linear_backward_weight",
        &[
            ("dW".into(), error(&e.download(&dw).unwrap(), &want_dw)),
            ("db".into(), error(&e.download(&db).unwrap(), &want_db)),
        ],
    )
}

fn merge<E: Executor>(e: &E) -> f64 {
    let l = Layer::new(23, 41, 5, 9);
    let coeff = values(5, 10, 0.5);
    let want: Vec<f32> = (0..l.base.len())
        .map(|i| l.base[i] + (0..5).map(|t| coeff[t] * l.tasks[t * l.base.len() + i]).sum::<f32>())
        .collect();
    let d = DeviceLayer::new(e, &l);
    let out = poisoned(e, l.base.len());
    ops::merge_experts(e, &d.base, &d.tasks, &e.upload(&coeff).unwrap(), l.base.len(), 5, &out).unwrap();
    worst("merge_experts", &[("23×41, T=5".into(), error(&e.download(&out).unwrap(), &want))])
}

fn router_head<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    for (i, &(batch, tokens, hidden, experts, softmax)) in
        // Up to the kernel's 32 experts, one per lane.
        [
            (3, 7, 45, 5, false),
            (2, 50, 33, 8, true),
            (5, 9, 70, 3, true),
            (2, 9, 40, 20, true),
            (1, 5, 33, 32, false),
        ]
        .iter()
        .enumerate()
    {
        let h = values(batch * tokens * hidden, 20 + i as u64, 1.0);
        let w2 = values(experts * hidden, 30 + i as u64, 0.3);
        let b2 = values(experts, 40 + i as u64, 0.3);
        let w2_t = transpose(&w2, experts, hidden);
        let logits =
            linear(&h, batch * tokens, hidden, MatRef::row_major(&w2_t, hidden, experts).unwrap(), Some(&b2)).unwrap();
        let want_w = router::router_reduce(&logits, batch, tokens, experts, softmax);
        let dw = values(batch * experts, 50 + i as u64, 1.0);
        let want_dl = router::router_reduce_backward(&logits, batch, tokens, experts, softmax, &dw);
        let want_dh =
            linear_backward_input(&want_dl, batch * tokens, MatRef::row_major(&w2_t, hidden, experts).unwrap())
                .unwrap();

        let (hb, w2b, b2b) = (e.upload(&h).unwrap(), e.upload(&w2).unwrap(), e.upload(&b2).unwrap());
        let (lb, wb) = (poisoned(e, batch * tokens * experts), poisoned(e, batch * experts));
        ops::router_head_forward(e, &hb, &w2b, &b2b, batch, tokens, hidden, experts, softmax, Some(&lb), &wb).unwrap();
        let (dl, dh) = (poisoned(e, batch * tokens * experts), poisoned(e, batch * tokens * hidden));
        ops::router_head_backward(
            e,
            &lb,
            &w2b,
            &e.upload(&dw).unwrap(),
            batch,
            tokens,
            hidden,
            experts,
            softmax,
            &dl,
            &dh,
        )
        .unwrap();
        let label = format!("B={batch} N={tokens} H={hidden} T={experts} softmax={softmax}");
        errors.push((format!("{label}: logits"), error(&e.download(&lb).unwrap(), &logits)));
        errors.push((format!("{label}: w"), error(&e.download(&wb).unwrap(), &want_w)));
        errors.push((format!("{label}: dlogits"), error(&e.download(&dl).unwrap(), &want_dl)));
        errors.push((format!("{label}: dh"), error(&e.download(&dh).unwrap(), &want_dh)));
    }
    // Batch routing: consecutive groups, the last one short.
    let (batch, group, experts) = (7, 3, 4);
    let w = values(batch * experts, 60, 1.0);
    let want: Vec<f32> = (0..batch.div_ceil(group))
        .flat_map(|g| {
            let members: Vec<usize> = (g * group..((g + 1) * group).min(batch)).collect();
            let w = &w;
            (0..experts).map(move |t| members.iter().map(|&b| w[b * experts + t]).sum::<f32>() / members.len() as f32)
        })
        .collect();
    let out = poisoned(e, want.len());
    ops::group_mean(e, &e.upload(&w).unwrap(), batch, group, experts, &out).unwrap();
    errors.push(("group_mean 7 in groups of 3".into(), error(&e.download(&out).unwrap(), &want)));
    worst("router_head_forward/backward, group_mean", &errors)
}

fn layer_norms<E: Executor>(e: &E) -> f64 {
    let (rows, width, eps) = (13, 77, 1e-5f32);
    let x: Vec<f32> = values(rows * width, 70, 2.0).iter().map(|v| v + 0.7).collect();
    let (w, b, dy) = (values(width, 71, 1.0), values(width, 72, 1.0), values(rows * width, 73, 1.0));
    let want_y = layer_norm::layer_norm(&x, width, &w, &b, eps);
    let want_dx = layer_norm::layer_norm_backward(&x, width, &w, eps, &dy);
    let (xb, wb, bb) = (e.upload(&x).unwrap(), e.upload(&w).unwrap(), e.upload(&b).unwrap());
    let (y, dx) = (poisoned(e, rows * width), poisoned(e, rows * width));
    ops::layer_norm_forward(e, &xb, &wb, &bb, rows, width, eps, &y).unwrap();
    ops::layer_norm_backward(e, &xb, &wb, &e.upload(&dy).unwrap(), rows, width, eps, &dx).unwrap();
    worst(
        "layer_norm_forward/backward",
        &[
            ("y".into(), error(&e.download(&y).unwrap(), &want_y)),
            ("dx".into(), error(&e.download(&dx).unwrap(), &want_dx)),
        ],
    )
}

/// The parameters' gradients of LayerNorm and of the patch embedding, which layer-wise AdaMerging trains:
/// against the CPU reference's f64 sums, over a few rows and over more than two chunks of 256 with a ragged
/// last one, widths that are not multiples of 32, and patches of three channels.
fn parameter_gradients<E: Executor>(e: &E) -> f64 {
    let up = |v: &[f32]| e.upload(v).unwrap();
    let mut errors = Vec::new();
    for (rows, width) in [(13, 77), (600, 45)] {
        let eps = 1e-5f32;
        let x: Vec<f32> = values(rows * width, 74, 2.0).iter().map(|v| v + 0.7).collect();
        let dy = values(rows * width, 75, 1.0);
        let (want_w, want_b) = layer_norm::layer_norm_backward_params(&x, width, eps, &dy);
        let (dw, db) = (poisoned(e, width), poisoned(e, width));
        ops::layer_norm_param_grads(e, &up(&x), &up(&dy), rows, width, eps, &dw, &db).unwrap();
        errors.push((format!("layer_norm dweight {rows}×{width}"), error(&e.download(&dw).unwrap(), &want_w)));
        errors.push((format!("layer_norm dbias {rows}×{width}"), error(&e.download(&db).unwrap(), &want_b)));
    }
    let g = PatchGeometry { batch: 3, channels: 3, image: 10, patch: 5, width: 7 };
    let pixels = values(g.batch * g.channels * g.image * g.image, 140, 1.0);
    let d_tokens = values(g.batch * g.tokens() * g.width, 141, 1.0);
    let (want_w, want_c, want_p) = cpu_patch::patch_embed_backward(&pixels, &d_tokens, g).unwrap();
    let (dw, dc, dp) = (poisoned(e, want_w.len()), poisoned(e, g.width), poisoned(e, want_p.len()));
    let geometry = (g.batch, g.channels, g.image, g.patch, g.width);
    ops::patch_embed_backward(e, &up(&pixels), &up(&d_tokens), geometry, &dw, &dc, &dp).unwrap();
    errors.push(("patch_embed dweight".into(), error(&e.download(&dw).unwrap(), &want_w)));
    errors.push(("patch_embed dclass".into(), error(&e.download(&dc).unwrap(), &want_c)));
    errors.push(("patch_embed dposition".into(), error(&e.download(&dp).unwrap(), &want_p)));
    worst("layer_norm_statistics/param_grads, patch_token_rows, column_sums", &errors)
}

/// Layer-wise AdaMerging on held task vectors: the merge gives the CPU's bits exactly (each product rounded
/// before it is added, never one fused multiply-add), the contraction its f64 sums; one expert and five,
/// sizes below one chunk of 8192 values and over two with a ragged last one.
fn task_vectors<E: Executor>(e: &E) -> f64 {
    let up = |v: &[f32]| e.upload(v).unwrap();
    let mut errors = Vec::new();
    for (n, experts) in [(1031, 1), (20_000, 5)] {
        let (base, tasks, lambdas) = (values(n, 150, 1.0), values(experts * n, 151, 0.1), values(experts, 152, 0.5));
        let refs: Vec<&[f32]> = tasks.chunks(n).collect();
        let want = cpu_task_vectors::merge_rounded(&base, &refs, &lambdas);
        let out = poisoned(e, n);
        ops::merge_rounded(e, &up(&base), &up(&tasks), &up(&lambdas), n, experts, &out).unwrap();
        errors.push((format!("merge_rounded n={n} T={experts} (bits)"), bits_apart(&e.download(&out).unwrap(), &want)));
        let g = values(n, 153, 1.0);
        let want = cpu_task_vectors::task_vector_dots(&refs, &g);
        let dots = poisoned(e, experts);
        ops::task_vector_dots(e, &up(&tasks), &up(&g), n, experts, &dots).unwrap();
        errors.push((format!("task_vector_dots n={n} T={experts}"), error(&e.download(&dots).unwrap(), &want)));
    }
    // 2^24 + 1 in the first chunk, −2^24 in the third: the total, 1, survives only if the chunks' partial
    // sums leave the kernel at more than f32's precision.
    let n = 2 * 8192 + 5;
    let (mut tau, mut g) = (vec![0.0f32; n], vec![0.0f32; n]);
    (tau[0], tau[1], tau[n - 1]) = (16_777_216.0, 1.0, -16_777_216.0);
    (g[0], g[1], g[n - 1]) = (1.0, 1.0, 1.0);
    let dots = poisoned(e, 1);
    ops::task_vector_dots(e, &up(&tau), &up(&g), n, 1, &dots).unwrap();
    errors.push(("task_vector_dots 2^24 + 1 − 2^24".into(), error(&e.download(&dots).unwrap(), &[1.0])));
    worst("merge_rounded, task_vector_dots", &errors)
}

fn activations<E: Executor>(e: &E) -> f64 {
    let n = 1031;
    let z: Vec<f32> = values(n, 80, 3.0);
    let dy = values(n, 81, 1.0);
    let (zb, dyb) = (e.upload(&z).unwrap(), e.upload(&dy).unwrap());
    let mut errors = Vec::new();
    for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
        let want: Vec<f32> = z.iter().map(|&v| activation::activate(v, act)).collect();
        let want_dz = activation::activation_backward(&z, &dy, act);
        let (y, dz) = (poisoned(e, n), poisoned(e, n));
        ops::activation_forward(e, &zb, n, act, &y).unwrap();
        ops::activation_backward(e, &zb, &dyb, n, act, &dz).unwrap();
        errors.push((format!("{act:?}"), error(&e.download(&y).unwrap(), &want)));
        errors.push((format!("{act:?}'"), error(&e.download(&dz).unwrap(), &want_dz)));
    }
    let sum = e.upload(&z).unwrap();
    ops::add_in_place(e, &sum, &dyb, n).unwrap();
    let want: Vec<f32> = z.iter().zip(&dy).map(|(a, b)| a + b).collect();
    errors.push(("add_in_place".into(), error(&e.download(&sum).unwrap(), &want)));
    // A product's epilogue: 31 rows of 29, with and without a bias.
    let (rows, width) = (31, 29);
    let b = values(width, 82, 1.0);
    for (bias, act) in [(true, Some(Activation::QuickGelu)), (false, Some(Activation::Relu)), (true, None)] {
        let want: Vec<f32> = z[..rows * width]
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let v = if bias { v + b[i % width] } else { v };
                act.map_or(v, |a| activation::activate(v, a))
            })
            .collect();
        let y = e.upload(&z[..rows * width]).unwrap();
        let bb = e.upload(&b).unwrap();
        ops::bias_activation(e, &y, bias.then_some(&bb), rows, width, act).unwrap();
        errors.push((format!("bias_activation, bias {bias}, {act:?}"), error(&e.download(&y).unwrap(), &want)));
    }
    worst("activation_forward/backward, add_in_place, bias_activation", &errors)
}

fn entropy_loss<E: Executor>(e: &E) -> f64 {
    let (rows, classes) = (37, 45);
    let logits: Vec<f32> = values(rows * classes, 90, 3.0);
    let want_mean = entropy::softmax_entropy(&logits, classes);
    let want_d = entropy::softmax_entropy_backward(&logits, classes);
    let (h, d) = (poisoned(e, rows), poisoned(e, rows * classes));
    ops::softmax_entropy(e, &e.upload(&logits).unwrap(), rows, classes, &h, &d).unwrap();
    let got_mean = e.download(&h).unwrap().iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
    worst(
        "softmax_entropy",
        &[
            ("mean entropy".into(), ((got_mean - want_mean) / want_mean).abs()),
            ("gradient".into(), error(&e.download(&d).unwrap(), &want_d)),
        ],
    )
}

fn adam<E: Executor>(e: &E) -> f64 {
    let n = 301;
    let mut params = std::collections::BTreeMap::from([("p".to_string(), values(n, 95, 1.0))]);
    let (pb, mb, vb) = (e.upload(&params["p"]).unwrap(), e.zeros(n).unwrap(), e.zeros(n).unwrap());
    let mut cpu = Adam::new(1e-3, (0.9, 0.999), 1e-8);
    for step in 1..=3u64 {
        let g = values(n, 96 + step, 1.0);
        let grads = std::collections::BTreeMap::from([("p".to_string(), g.clone())]);
        cpu.update(&mut params, &grads, 1e-3).unwrap();
        ops::adam_step(e, &pb, &e.upload(&g).unwrap(), &mb, &vb, n, 1e-3, (0.9, 0.999), 1e-8, step).unwrap();
    }
    let start = values(n, 95, 1.0);
    let want: Vec<f32> = params["p"].iter().zip(&start).map(|(p, s)| p - s).collect();
    let got: Vec<f32> = e.download(&pb).unwrap().iter().zip(&start).map(|(p, s)| p - s).collect();
    worst("adam_step", &[("3 steps, relative to the update".into(), error(&got, &want))])
}

fn attention<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    // Token counts off the 8 rows per block and the 32 lanes; head widths under and over a warp.
    for (i, &(b, n, d, heads)) in [(2, 13, 12, 3), (1, 50, 130, 2), (2, 37, 96, 1)].iter().enumerate() {
        let seed = 110 + 10 * i as u64;
        let (q, k, v, g) = (
            values(b * n * d, seed, 1.0),
            values(b * n * d, seed + 1, 1.0),
            values(b * n * d, seed + 2, 1.0),
            values(b * n * d, seed + 3, 1.0),
        );
        let want = cpu_attention::attention(&q, &k, &v, b, n, d, heads).unwrap();
        let (wq, wk, wv) = cpu_attention::attention_backward(&q, &k, &v, &g, b, n, d, heads).unwrap();
        let (qb, kb, vb, gb) =
            (e.upload(&q).unwrap(), e.upload(&k).unwrap(), e.upload(&v).unwrap(), e.upload(&g).unwrap());
        let out = poisoned(e, b * n * d);
        ops::attention_forward(e, &qb, &kb, &vb, b, n, d, heads, &out).unwrap();
        let (dq, dk, dv) = (poisoned(e, b * n * d), poisoned(e, b * n * d), poisoned(e, b * n * d));
        ops::attention_backward(e, &qb, &kb, &vb, &gb, b, n, d, heads, (&dq, &dk, &dv)).unwrap();
        let label = format!("B={b} N={n} D={d} heads={heads}");
        errors.push((format!("{label}: out"), error(&e.download(&out).unwrap(), &want)));
        errors.push((format!("{label}: dq"), error(&e.download(&dq).unwrap(), &wq)));
        errors.push((format!("{label}: dk"), error(&e.download(&dk).unwrap(), &wk)));
        errors.push((format!("{label}: dv"), error(&e.download(&dv).unwrap(), &wv)));
    }
    worst("attention_forward, attention_backward_rows/_columns", &errors)
}

fn token_ops<E: Executor>(e: &E) -> f64 {
    let mut errors = Vec::new();
    // Patch embedding: 3 channels, 10×10 images in 5×5 patches, width 7.
    let g = PatchGeometry { batch: 2, channels: 3, image: 10, patch: 5, width: 7 };
    let pixels = values(2 * 3 * 100, 130, 1.0);
    let weight = values(7 * 3 * 25, 131, 0.2);
    let (class, pos) = (values(7, 132, 1.0), values(g.tokens() * 7, 133, 1.0));
    let want = cpu_patch::patch_embed(&pixels, &weight, &class, &pos, g).unwrap();
    let out = poisoned(e, want.len());
    let up = |v: &[f32]| e.upload(v).unwrap();
    ops::patch_embed(e, &up(&pixels), &up(&weight), &up(&class), &up(&pos), (2, 3, 10, 5, 7), &out).unwrap();
    errors.push(("patch_embed".into(), error(&e.download(&out).unwrap(), &want)));
    // Token selection and its backward, L2 normalisation and its backward.
    let (b, n, d) = (3, 5, 37);
    let x = values(b * n * d, 134, 1.0);
    let sel = poisoned(e, b * d);
    ops::select_token(e, &up(&x), b, n, d, 2, false, &sel).unwrap();
    errors.push(("select_token".into(), error(&e.download(&sel).unwrap(), &rows::select_token(&x, n, d, 2))));
    let dy = values(b * d, 135, 1.0);
    let back = poisoned(e, b * n * d);
    ops::select_token(e, &up(&dy), b, n, d, 2, true, &back).unwrap();
    let mut want = vec![0.0f32; b * n * d];
    for s in 0..b {
        want[(s * n + 2) * d..(s * n + 3) * d].copy_from_slice(&dy[s * d..(s + 1) * d]);
    }
    errors.push(("select_token_backward".into(), error(&e.download(&back).unwrap(), &want)));
    let (xr, gr) = (values(b * d, 136, 1.0), values(b * d, 137, 1.0));
    let y = poisoned(e, b * d);
    ops::l2_normalize(e, &up(&xr), None, b, d, &y).unwrap();
    errors.push(("l2_normalize".into(), error(&e.download(&y).unwrap(), &rows::l2_normalize(&xr, d))));
    ops::l2_normalize(e, &up(&xr), Some(&up(&gr)), b, d, &y).unwrap();
    errors.push((
        "l2_normalize_backward".into(),
        error(&e.download(&y).unwrap(), &rows::l2_normalize_backward(&xr, d, &gr)),
    ));
    // The router's reduction from logits, both activations, and its backward; mean over rows; scale; copy.
    for softmax in [false, true] {
        let (b, n, t) = (3, 11, 5);
        let logits = values(b * n * t, 138, 2.0);
        let dw = values(b * t, 139, 1.0);
        let (w, dl) = (poisoned(e, b * t), poisoned(e, b * n * t));
        ops::router_reduce(e, &up(&logits), b, n, t, softmax, &w).unwrap();
        ops::router_reduce_backward(e, &up(&logits), &up(&dw), b, n, t, softmax, &dl).unwrap();
        errors.push((
            format!("router_reduce softmax={softmax}"),
            error(&e.download(&w).unwrap(), &router::router_reduce(&logits, b, n, t, softmax)),
        ));
        let want = router::router_reduce_backward(&logits, b, n, t, softmax, &dw);
        errors.push((format!("router_reduce_backward softmax={softmax}"), error(&e.download(&dl).unwrap(), &want)));
    }
    let m = poisoned(e, d);
    ops::mean_rows(e, &up(&x), b * n, d, &m).unwrap();
    errors.push(("mean_rows".into(), error(&e.download(&m).unwrap(), &router::mean_rows(&x, d))));
    let sc = poisoned(e, x.len());
    ops::scale(e, &up(&x), x.len(), -0.37, &sc).unwrap();
    errors.push(("scale".into(), error(&e.download(&sc).unwrap(), &x.iter().map(|v| v * -0.37).collect::<Vec<_>>())));
    ops::copy(e, &up(&x), x.len(), &sc).unwrap();
    errors.push(("copy".into(), error(&e.download(&sc).unwrap(), &x)));
    worst("tokens.cu", &errors)
}

fn report(kernel: &str, executor: &str, err: f64) {
    println!("kernel-check {kernel} on {executor}: max relative error {err:.2e}");
    assert!(err <= KERNEL_REL_TOL, "{kernel} on {executor}: relative error {err:.3e} > {KERNEL_REL_TOL:e}");
}

macro_rules! kernel_tests {
    ($($case:ident),* $(,)?) => {
        mod host {
            $(#[test]
            fn $case() {
                super::report(stringify!($case), "host emulation", super::$case(&super::HostExecutor));
            })*
        }
        mod gpu {
            $(#[test]
            #[ignore = "needs a GPU: tools/gpu-check.sh runs these with --ignored"]
            fn $case() {
                let e = super::GpuExecutor::new(0).expect("a CUDA device");
                super::report(stringify!($case), &super::Executor::describe(&e), super::$case(&e));
            })*
        }
    };
}

kernel_tests!(
    expert_linear_forward,
    expert_linear_grouped,
    expert_linear_staged,
    expert_linear_candidates_agree,
    expert_linear_tf32,
    expert_linear_bf16,
    expert_linear_backward,
    linear_weight_gradient,
    merge,
    router_head,
    layer_norms,
    parameter_gradients,
    task_vectors,
    activations,
    entropy_loss,
    adam,
    attention,
    token_ops,
);
