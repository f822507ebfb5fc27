//! The CPU backend: f32, multithreaded with rayon, the reference every other backend is tested against.
//! With `--precision bf16` (on CPUs with AMX, or AMD's AVX-512 BF16) the forward's linear layers multiply bf16
//! operands (`ops::bf16`): dense ones, batch routing's merged WEMoE weight, and per-sample routing's merged tiles
//! (`ops::expert_linear::expert_linear_bf16`); and so do the backward's products through frozen weights: dense
//! layers' input gradients and the WEMoE layers' backward in either routing
//! (`ops::expert_linear::expert_linear_backward_bf16`). The attention products and the routers' own weight
//! gradients stay f32.

use anyhow::{bail, ensure, Result};

use super::flops;
use super::op_times::OpTimer;
use super::{
    rows_and_width, with_last, Activation, Backend, Device, ExpertLinear, LinearWeight, Precision, WeightLayout,
};
use crate::ops::{self, patch_embed::PatchGeometry};
use crate::tensor::Tensor;

/// The CPU backend; it computes with the rayon global pool.
#[derive(Default)]
pub struct CpuBackend {
    /// The forward's products in bf16 (`ops::bf16`).
    bf16: bool,
}

impl CpuBackend {
    /// A CPU backend on the rayon global thread pool, in f32.
    pub fn new() -> Self {
        CpuBackend { bf16: false }
    }

    /// A CPU backend computing its forward products in `precision`: f32, or bf16 where the CPU has a unit for
    /// them (`ops::bf16::unit`).
    pub fn with_precision(precision: Precision) -> Result<Self> {
        match precision {
            Precision::F32 => Ok(CpuBackend::new()),
            Precision::Tf32 => bail!("--precision tf32 needs a GPU; the CPU computes in f32 or bf16"),
            Precision::Bf16 if ops::bf16::available() => Ok(CpuBackend { bf16: true }),
            Precision::Bf16 => bail!("--precision bf16 on the CPU needs {}", ops::bf16::unavailable_reason()),
        }
    }

    /// `x·w + bias` for `x` `[rows, k]` and `w` `[k, n]` (row-major) in the backend's precision.
    fn product(&self, x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        if self.bf16 {
            return ops::bf16::linear(x, rows, k, &ops::bf16::pack_rhs(w, k, n)?, bias);
        }
        ops::gemm::linear(x, rows, k, ops::gemm::MatRef::row_major(w, k, n)?, bias)
    }
}

/// The groups of a WEMoE layer's `coefficients` `[G, experts]` over `rows` rows (`op` names the caller in the
/// error): at least one, and splitting the rows evenly.
fn coefficient_groups(op: &str, rows: usize, coefficients: &Tensor, experts: usize) -> Result<usize> {
    let shape = coefficients.shape();
    ensure!(shape.len() == 2 && shape[1] == experts, "{op}: coefficients {shape:?} are not [G, {experts}]");
    let groups = shape[0];
    ensure!(groups > 0 && rows.is_multiple_of(groups), "{op}: {rows} rows do not split into {groups} groups");
    Ok(groups)
}

/// The CPU reference's view of an expert linear layer prepared by this backend.
fn host_view(w: &ExpertLinear) -> Result<ops::expert_linear::ExpertLinearRef<'_>> {
    ensure!(w.layout == WeightLayout::Blocked, "expert linear weights not prepared by the CPU backend");
    fn host(v: &[Tensor]) -> Result<Vec<&[f32]>> {
        v.iter().map(Tensor::host).collect()
    }
    Ok(ops::expert_linear::ExpertLinearRef {
        base_weight: w.base_weight.host()?,
        base_bias: w.base_bias.host()?,
        task_weights: host(&w.task_weights)?,
        task_biases: host(&w.task_biases)?,
        out_features: w.out_features(),
        in_features: w.in_features(),
    })
}

/// A dense Linear's weight as the `[in, out]` right-hand side of a product.
fn dense_rhs(w: &LinearWeight) -> Result<ops::gemm::MatRef<'_>> {
    let (k, n, data) = (w.in_features(), w.out_features(), w.tensor().host()?);
    match w.layout() {
        WeightLayout::InOut => ops::gemm::MatRef::row_major(data, k, n),
        WeightLayout::OutIn => Ok(ops::gemm::MatRef::row_major(data, n, k)?.t()),
        WeightLayout::Blocked => bail!("a dense linear weight is never stored blocked"),
    }
}

fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    ensure!(a.shape() == b.shape(), "{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    Ok(())
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn precision(&self) -> Precision {
        if self.bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    fn describe(&self) -> String {
        let precision = match ops::bf16::unit() {
            Some(unit) if self.bf16 => format!(", bf16 on {unit}"),
            _ => String::new(),
        };
        let kernels = ops::expert_linear::Kernel::detect().name();
        let threads = match rayon::current_num_threads() {
            1 => "1 thread".to_string(),
            n => format!("{n} threads"),
        };
        format!("cpu ({threads}, {kernels}{precision})")
    }

    fn upload(&self, tensor: Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("upload");
        Ok(tensor)
    }

    fn to_host(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        let _timer = OpTimer::start("to_host");
        Ok(tensor.host()?.to_vec())
    }

    /// Transposes to `[in, out]` once: the GEMM runs 15–20% faster with a row-major right-hand side
    /// than with PyTorch's layout (BENCHMARKS.md), and every forward pays for the difference.
    fn prepare_linear(&self, weight: Tensor) -> Result<LinearWeight> {
        let _timer = OpTimer::start("prepare_linear");
        ensure!(weight.shape().len() == 2, "linear weight must be 2-D, got {:?}", weight.shape());
        let (out, inp) = (weight.shape()[0], weight.shape()[1]);
        let t = ops::transpose::transpose(weight.host()?, out, inp);
        LinearWeight::new(Tensor::from_vec(&[inp, out], t)?, WeightLayout::InOut, out, inp)
    }

    fn linear(&self, x: &Tensor, w: &LinearWeight, b: Option<&Tensor>) -> Result<Tensor> {
        let mut timer = OpTimer::start("linear");
        let (rows, k) = rows_and_width(x);
        let n = w.out_features();
        ensure!(w.in_features() == k, "linear: input width {k} does not match weight {n}×{}", w.in_features());
        timer.count(flops::product(rows, k, n));
        if let Some(b) = b {
            ensure!(b.shape() == [n], "linear: bias {:?} does not match {n} outputs", b.shape());
        }
        let bias = b.map(|b| b.host()).transpose()?;
        let y = match w.layout() {
            WeightLayout::InOut => self.product(x.host()?, rows, k, w.tensor().host()?, n, bias)?,
            _ => ops::gemm::linear(x.host()?, rows, k, dense_rhs(w)?, bias)?,
        };
        Tensor::from_vec(&with_last(x.shape(), n), y)
    }

    fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
        let _timer = OpTimer::start("layer_norm");
        let (_, width) = rows_and_width(x);
        ensure!(
            weight.shape() == [width] && bias.shape() == [width],
            "layer_norm: weight {:?} / bias {:?} do not match width {width}",
            weight.shape(),
            bias.shape()
        );
        let y = ops::layer_norm::layer_norm(x.host()?, width, weight.host()?, bias.host()?, eps);
        Tensor::from_vec(x.shape(), y)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let mut timer = OpTimer::start("attention");
        same_shape("attention", q, k)?;
        same_shape("attention", q, v)?;
        ensure!(q.shape().len() == 3, "attention: expected [B, N, D], got {:?}", q.shape());
        let (b, n, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        timer.count(flops::attention(b, n, d));
        ensure!(heads > 0 && d % heads == 0, "attention: width {d} is not divisible by {heads} heads");
        let y = ops::attention::attention(q.host()?, k.host()?, v.host()?, b, n, d, heads)?;
        Tensor::from_vec(q.shape(), y)
    }

    fn activation(&self, x: Tensor, act: Activation) -> Result<Tensor> {
        let _timer = OpTimer::start("activation");
        let shape = x.shape().to_vec();
        let mut values = x.into_host_vec()?;
        ops::activation::activation_in_place(&mut values, act);
        Tensor::from_vec(&shape, values)
    }

    fn activated(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let _timer = OpTimer::start("activation");
        Tensor::from_vec(x.shape(), ops::activation::activation(x.host()?, act))
    }

    fn add(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("add");
        same_shape("add", &a, b)?;
        let shape = a.shape().to_vec();
        let mut values = a.into_host_vec()?;
        ops::rows::add_in_place(&mut values, b.host()?);
        Tensor::from_vec(&shape, values)
    }

    fn patch_embed(
        &self,
        pixels: &Tensor,
        weight: &Tensor,
        class_embedding: &Tensor,
        position_embedding: &Tensor,
    ) -> Result<Tensor> {
        let mut timer = OpTimer::start("patch_embed");
        let ps = pixels.shape();
        let ws = weight.shape();
        ensure!(ps.len() == 4 && ps[2] == ps[3], "patch_embed: pixels must be [B, C, S, S], got {ps:?}");
        ensure!(
            ws.len() == 4 && ws[1] == ps[1] && ws[2] == ws[3],
            "patch_embed: weight {ws:?} does not fit pixels {ps:?}"
        );
        let g = PatchGeometry { batch: ps[0], channels: ps[1], image: ps[2], patch: ws[2], width: ws[0] };
        ensure!(class_embedding.shape() == [g.width], "patch_embed: class embedding {:?}", class_embedding.shape());
        ensure!(
            position_embedding.shape() == [g.tokens(), g.width],
            "patch_embed: position embedding {:?} does not match {} tokens of width {}",
            position_embedding.shape(),
            g.tokens(),
            g.width
        );
        timer.count(flops::product(g.batch * g.grid() * g.grid(), g.channels * g.patch * g.patch, g.width));
        let y = ops::patch_embed::patch_embed(
            pixels.host()?,
            weight.host()?,
            class_embedding.host()?,
            position_embedding.host()?,
            g,
        )?;
        Tensor::from_vec(&[g.batch, g.tokens(), g.width], y)
    }

    fn select_token(&self, x: &Tensor, index: usize) -> Result<Tensor> {
        let _timer = OpTimer::start("select_token");
        ensure!(x.shape().len() == 3, "select_token: expected [B, N, D], got {:?}", x.shape());
        let (b, n, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        ensure!(index < n, "select_token: token {index} of {n}");
        Tensor::from_vec(&[b, d], ops::rows::select_token(x.host()?, n, d, index))
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("l2_normalize");
        let (_, width) = rows_and_width(x);
        Tensor::from_vec(x.shape(), ops::rows::l2_normalize(x.host()?, width))
    }

    fn scale(&self, x: &Tensor, factor: f32) -> Result<Tensor> {
        let _timer = OpTimer::start("scale");
        Tensor::from_vec(x.shape(), x.host()?.iter().map(|v| v * factor).collect())
    }

    /// Stores every weight blocked once (`ops::expert_linear::to_blocked`): a tile of 32 outputs × a chunk of
    /// inputs is then one contiguous run, which the per-sample merge streams.
    fn prepare_expert_linear(
        &self,
        base_weight: Tensor,
        base_bias: Tensor,
        task_weights: Vec<Tensor>,
        task_biases: Vec<Tensor>,
    ) -> Result<ExpertLinear> {
        let _timer = OpTimer::start("prepare_expert_linear");
        let blocked = |w: Tensor| -> Result<Tensor> {
            ensure!(w.shape().len() == 2, "expert weight must be 2-D, got {:?}", w.shape());
            let (out, inp) = (w.shape()[0], w.shape()[1]);
            let data = ops::expert_linear::to_blocked(w.host()?, out, inp);
            Tensor::from_vec(&ops::expert_linear::blocked_shape(out, inp), data)
        };
        let task_weights = task_weights.into_iter().map(blocked).collect::<Result<_>>()?;
        ExpertLinear::new(blocked(base_weight)?, base_bias, task_weights, task_biases, WeightLayout::Blocked)
    }

    fn expert_linear(&self, x: &Tensor, coefficients: &Tensor, w: &ExpertLinear) -> Result<Tensor> {
        let mut timer = OpTimer::start("expert_linear");
        let (rows, k) = rows_and_width(x);
        ensure!(k == w.in_features(), "expert_linear: input width {k} does not match {}", w.in_features());
        timer.count(flops::product(rows, k, w.out_features()));
        let groups = coefficient_groups("expert_linear", rows, coefficients, w.experts())?;
        let weights = host_view(w)?;
        let (xs, c) = (x.host()?, coefficients.host()?);
        let y = if self.bf16 {
            ops::expert_linear::expert_linear_bf16(xs, groups, rows / groups, c, &weights)?
        } else {
            ops::expert_linear::expert_linear(xs, groups, rows / groups, c, &weights)?
        };
        Tensor::from_vec(&with_last(x.shape(), w.out_features()), y)
    }

    fn expert_mlp(
        &self,
        x: &Tensor,
        coefficients: &Tensor,
        fc1: &ExpertLinear,
        fc2: &ExpertLinear,
        act: Activation,
    ) -> Result<Tensor> {
        if self.bf16 {
            // The bf16 products keep their own layers (`expert_linear_bf16`).
            return super::expert_mlp_in_steps(self, x, coefficients, fc1, fc2, act);
        }
        let mut timer = OpTimer::start("expert_mlp");
        let (rows, k) = rows_and_width(x);
        ensure!(k == fc1.in_features(), "expert_mlp: input width {k} does not match {}", fc1.in_features());
        timer.count(
            flops::product(rows, k, fc1.out_features()) + flops::product(rows, fc2.in_features(), fc2.out_features()),
        );
        let groups = coefficient_groups("expert_mlp", rows, coefficients, fc1.experts())?;
        let (w1, w2) = (host_view(fc1)?, host_view(fc2)?);
        let y = ops::expert_linear::expert_mlp(x.host()?, groups, rows / groups, coefficients.host()?, &w1, &w2, act)?;
        Tensor::from_vec(&with_last(x.shape(), fc2.out_features()), y)
    }

    fn router_reduce(&self, logits: &Tensor, softmax: bool) -> Result<Tensor> {
        let _timer = OpTimer::start("router_reduce");
        ensure!(logits.shape().len() == 3, "router_reduce: expected [B, N, T], got {:?}", logits.shape());
        let (b, n, t) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
        Tensor::from_vec(&[b, t], ops::router::router_reduce(logits.host()?, b, n, t, softmax))
    }

    fn mean_rows(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("mean_rows");
        let (_, width) = rows_and_width(x);
        Tensor::from_vec(&[1, width], ops::router::mean_rows(x.host()?, width))
    }

    fn copy(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("copy");
        Tensor::from_vec(x.shape(), x.host()?.to_vec())
    }

    fn linear_backward_input(&self, dy: &Tensor, w: &LinearWeight) -> Result<Tensor> {
        let mut timer = OpTimer::start("linear_backward_input");
        let (rows, n) = rows_and_width(dy);
        ensure!(n == w.out_features(), "linear_backward_input: gradient width {n} for {} outputs", w.out_features());
        let k = w.in_features();
        timer.count(flops::product(rows, n, k));
        let rhs = dense_rhs(w)?;
        let dx = if self.bf16 {
            ops::bf16::linear(dy.host()?, rows, n, &ops::bf16::pack_rhs_view(rhs.t())?, None)?
        } else {
            ops::gemm::linear_backward_input(dy.host()?, rows, rhs)?
        };
        Tensor::from_vec(&with_last(dy.shape(), k), dx)
    }

    fn linear_backward_weight(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut timer = OpTimer::start("linear_backward_weight");
        let ((m, k), (m2, n)) = (rows_and_width(x), rows_and_width(dy));
        ensure!(m == m2, "linear_backward_weight: {m} input rows, {m2} gradient rows");
        timer.count(flops::product(m, k, n));
        let (dw, db) = ops::gemm::linear_backward_weight(x.host()?, dy.host()?, m, k, n)?;
        Ok((Tensor::from_vec(&[n, k], dw)?, Tensor::from_vec(&[n], db)?))
    }

    fn layer_norm_backward(&self, x: &Tensor, weight: &Tensor, eps: f32, dy: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("layer_norm_backward");
        same_shape("layer_norm_backward", x, dy)?;
        let (_, width) = rows_and_width(x);
        ensure!(
            weight.shape() == [width],
            "layer_norm_backward: weight {:?} does not match width {width}",
            weight.shape()
        );
        Tensor::from_vec(
            x.shape(),
            ops::layer_norm::layer_norm_backward(x.host()?, width, weight.host()?, eps, dy.host()?),
        )
    }

    fn activation_backward(&self, z: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        let _timer = OpTimer::start("activation_backward");
        same_shape("activation_backward", z, dy)?;
        Tensor::from_vec(z.shape(), ops::activation::activation_backward(z.host()?, dy.host()?, act))
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut timer = OpTimer::start("attention_backward");
        same_shape("attention_backward", q, d_out)?;
        let (b, n, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        timer.count(flops::attention_backward(b, n, d));
        let (dq, dk, dv) =
            ops::attention::attention_backward(q.host()?, k.host()?, v.host()?, d_out.host()?, b, n, d, heads)?;
        Ok((Tensor::from_vec(q.shape(), dq)?, Tensor::from_vec(q.shape(), dk)?, Tensor::from_vec(q.shape(), dv)?))
    }

    fn router_reduce_backward(&self, logits: &Tensor, softmax: bool, dw: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("router_reduce_backward");
        let (b, n, t) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
        ensure!(dw.shape() == [b, t], "router_reduce_backward: gradient {:?} for [{b}, {t}]", dw.shape());
        Tensor::from_vec(
            logits.shape(),
            ops::router::router_reduce_backward(logits.host()?, b, n, t, softmax, dw.host()?),
        )
    }

    fn expert_linear_backward(
        &self,
        x: &Tensor,
        coefficients: &Tensor,
        w: &ExpertLinear,
        dy: &Tensor,
        input_gradient: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let mut timer = OpTimer::start("expert_linear_backward");
        let (rows, _) = rows_and_width(x);
        timer.count(flops::expert_linear_backward(rows, w.in_features(), w.out_features(), input_gradient));
        let groups = coefficient_groups("expert_linear_backward", rows, coefficients, w.experts())?;
        let weights = host_view(w)?;
        let (xs, c, dys) = (x.host()?, coefficients.host()?, dy.host()?);
        let (dx, dc) = if self.bf16 {
            ops::expert_linear::expert_linear_backward_bf16(
                xs,
                groups,
                rows / groups,
                c,
                &weights,
                dys,
                input_gradient,
            )?
        } else {
            ops::expert_linear::expert_linear_backward(xs, groups, rows / groups, c, &weights, dys, input_gradient)?
        };
        Ok((dx.map(|dx| Tensor::from_vec(x.shape(), dx)).transpose()?, Tensor::from_vec(coefficients.shape(), dc)?))
    }

    fn l2_normalize_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start("l2_normalize_backward");
        same_shape("l2_normalize_backward", x, dy)?;
        let (_, width) = rows_and_width(x);
        Tensor::from_vec(x.shape(), ops::rows::l2_normalize_backward(x.host()?, width, dy.host()?))
    }

    fn softmax_entropy(&self, logits: &Tensor) -> Result<(f64, Tensor)> {
        let _timer = OpTimer::start("softmax_entropy");
        let (_, classes) = rows_and_width(logits);
        let h = ops::entropy::softmax_entropy(logits.host()?, classes);
        Ok((h, Tensor::from_vec(logits.shape(), ops::entropy::softmax_entropy_backward(logits.host()?, classes))?))
    }

    fn select_token_backward(&self, dy: &Tensor, tokens: usize, index: usize) -> Result<Tensor> {
        let _timer = OpTimer::start("select_token_backward");
        let (b, d) = (dy.shape()[0], dy.shape()[1]);
        let mut dx = vec![0.0f32; b * tokens * d];
        for (sample, g) in dx.chunks_exact_mut(tokens * d).zip(dy.host()?.chunks_exact(d)) {
            sample[index * d..(index + 1) * d].copy_from_slice(g);
        }
        Tensor::from_vec(&[b, tokens, d], dx)
    }
}
