//! The CUDA backend: every operation of [`Backend`] as launches of `kernels/*.cu`, weights resident on the
//! device. Generic over the [`Executor`]: on a GPU it runs through the driver; over the host emulation it
//! runs the same kernels and launch code on the CPU, which is how `cargo test` proves the whole graph
//! (forward and backward) against the CPU backend on machines without a GPU.
//!
//! Exact f32 by default; with [`Precision::Tf32`] or [`Precision::Bf16`] the forward's linear layers run on
//! tensor cores (the backward stays f32). Plain dense f32 products go to the executor's vendor GEMM (cuBLAS)
//! where it has one, else to the kernels' dense mode (`experts = 0`). Per-sample routing runs a fused kernel,
//! never storing a sample's merged weight: of the interchangeable ones, each shape's fastest, timed on the
//! device the first time the shape runs ([`WemoeKernels`]); a single group (batch routing) merges its one
//! weight and multiplies densely.

use std::any::Any;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};

use super::flops;
use super::kernel_choice::{Choice, KernelChoices, WemoeKernels};
use super::op_times::{DeviceQueue, OpTimer};
use super::{
    check_merge, check_task_vectors, patch_backward_geometry, rows_and_width, with_last, Activation, Backend, Device,
    ExpertLinear, LinearWeight, Precision, WeightLayout,
};
use crate::cuda::ops::{self as k, ExpertWeights, ForwardKernel, InputGradientKernel, MmaOperands};
use crate::cuda::Executor;
use crate::tensor::{DeviceBuffer, Storage, Tensor};

/// The CUDA backend over executor `E`.
pub struct CudaBackend<E: Executor> {
    executor: E,
    device: Device,
    precision: Precision,
    kernels: WemoeKernels,
    vendor: bool,
    forward_choices: KernelChoices<ForwardKernel>,
    input_choices: KernelChoices<InputGradientKernel>,
}

impl<E> CudaBackend<E>
where
    E: Executor + Send + Sync,
    E::Buffer: Send + Sync + 'static,
{
    /// A backend over `executor`, reporting `device`.
    pub fn new(executor: E, device: Device) -> Self {
        CudaBackend {
            executor,
            device,
            precision: Precision::F32,
            kernels: WemoeKernels::Tuned,
            vendor: true,
            forward_choices: KernelChoices::default(),
            input_choices: KernelChoices::default(),
        }
    }

    /// The same backend computing its forward products in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        CudaBackend { precision, ..self }
    }

    /// The same backend running its per-sample WEMoE products (f32) on `kernels` (default: each shape's
    /// fastest, timed on the device).
    pub fn with_wemoe_kernels(self, kernels: WemoeKernels) -> Self {
        CudaBackend { kernels, ..self }
    }

    /// The kernels chosen so far by timing, forward then input gradient (for benchmarks and reports).
    pub fn kernel_choices(&self) -> (Vec<Choice<ForwardKernel>>, Vec<Choice<InputGradientKernel>>) {
        (self.forward_choices.made(), self.input_choices.made())
    }

    /// The same backend with its plain dense f32 products (attention and router projections, batch routing's
    /// merged layers, and their input gradients) on the executor's vendor GEMM (cuBLAS on a GPU, the CPU
    /// GEMM in the host emulation) when `on` (the default), or all on the engine's own kernels.
    pub fn with_vendor_products(self, on: bool) -> Self {
        CudaBackend { vendor: on, ..self }
    }

    /// `y = act(x·W_rᵀ + b_r)` per route in the backend's precision (forward only).
    #[allow(clippy::too_many_arguments)]
    fn forward_product(
        &self,
        x: &E::Buffer,
        routes: usize,
        rows_per_route: usize,
        w: &ExpertWeights<E::Buffer>,
        coeff: Option<&E::Buffer>,
        act: Option<Activation>,
        y: &E::Buffer,
    ) -> Result<()> {
        let e = &self.executor;
        let rows = routes * rows_per_route;
        let (inp, out) = (w.in_features, w.out_features);
        if self.precision == Precision::F32
            && self.vendor
            && w.experts == 0
            && e.vendor_product(x, w.base, y, rows, inp, out, true)?
        {
            return k::bias_activation(e, y, w.base_bias, rows, out, act);
        }
        let operands = match self.precision {
            Precision::F32 => {
                let shape = [routes, rows_per_route, inp, out, w.experts];
                let run =
                    |kernel| k::expert_linear_forward_by(e, kernel, x, routes, rows_per_route, w, coeff, act, None, y);
                let kernel = match (self.kernels, w.experts) {
                    (_, 0) | (WemoeKernels::Direct, _) => ForwardKernel::Direct,
                    (WemoeKernels::Staged, _) => ForwardKernel::Staged(1),
                    (WemoeKernels::Tuned, _) => {
                        self.forward_choices
                            .choose(shape, &ForwardKernel::CANDIDATES, |c| e.measure_ms(&mut || run(c)))?
                    }
                };
                return run(kernel);
            }
            Precision::Tf32 => MmaOperands::Tf32,
            Precision::Bf16 => MmaOperands::Bf16,
        };
        k::expert_linear_forward_mma(e, operands, x, routes, rows_per_route, w, coeff, act, y)
    }

    /// `dx_r = dy_r · W_r` per route (f32): plain dense ones on the vendor GEMM when it is on and there.
    fn input_product(
        &self,
        dy: &E::Buffer,
        routes: usize,
        rows_per_route: usize,
        w: &ExpertWeights<E::Buffer>,
        coeff: Option<&E::Buffer>,
        dx: &E::Buffer,
    ) -> Result<()> {
        let e = &self.executor;
        let rows = routes * rows_per_route;
        if self.vendor
            && w.experts == 0
            && e.vendor_product(dy, w.base, dx, rows, w.out_features, w.in_features, false)?
        {
            return Ok(());
        }
        let run = |kernel| k::expert_linear_backward_input(e, kernel, dy, routes, rows_per_route, w, coeff, dx);
        let kernel = match (self.kernels, w.experts) {
            (_, 0) | (WemoeKernels::Direct, _) => InputGradientKernel::Direct,
            (WemoeKernels::Staged, _) => InputGradientKernel::Staged,
            (WemoeKernels::Tuned, experts) => {
                let shape = [routes, rows_per_route, w.in_features, w.out_features, experts];
                self.input_choices.choose(shape, &InputGradientKernel::CANDIDATES, |c| e.measure_ms(&mut || run(c)))?
            }
        };
        run(kernel)
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// The executor back, for a backend with other settings around it: tensors made by this one live in
    /// the executor's buffers and stay usable there.
    pub fn into_executor(self) -> E {
        self.executor
    }

    /// A new device tensor of `shape` (zeros).
    fn alloc(&self, shape: &[usize]) -> Result<Tensor> {
        let len: usize = shape.iter().product();
        let buffer = self.executor.zeros(len)?;
        Tensor::on_device(shape, DeviceBuffer { device: self.device, buffer: Arc::new(buffer), offset: 0, len })
    }

    /// The executor's buffer behind `t`, which must be a whole buffer made by this backend.
    fn buf<'t>(&self, t: &'t Tensor) -> Result<&'t E::Buffer> {
        match t.storage() {
            Storage::Device(d) => {
                ensure!(d.offset == 0, "tensor {:?} is a range of a shared buffer, not a whole one", t.shape());
                d.buffer
                    .downcast_ref::<E::Buffer>()
                    .ok_or_else(|| anyhow!("tensor {:?} belongs to another backend", t.shape()))
            }
            Storage::Cpu(_) => {
                Err(anyhow!("tensor {:?} is on the host; upload it to {} first", t.shape(), self.device))
            }
        }
    }

    /// The shared buffer behind consecutive ranges `parts` (stacked task vectors), checked.
    fn stacked<'t>(&self, parts: &'t [Tensor]) -> Result<&'t E::Buffer> {
        let first = match parts.first().map(Tensor::storage) {
            Some(Storage::Device(d)) => d,
            _ => return Err(anyhow!("task vectors are not on {}", self.device)),
        };
        let mut offset = 0;
        for p in parts {
            match p.storage() {
                Storage::Device(d) if Arc::ptr_eq(&d.buffer, &first.buffer) && d.offset == offset => offset += d.len,
                _ => {
                    return Err(anyhow!(
                        "task vectors were not stacked by this backend (prepare_expert_linear, hold_task_vectors)"
                    ))
                }
            }
        }
        first.buffer.downcast_ref::<E::Buffer>().ok_or_else(|| anyhow!("task vectors of another backend"))
    }

    /// Uploads host vectors stacked into one buffer, as tensors of `shape` over consecutive ranges.
    fn upload_stacked(&self, parts: &[Tensor], shape: &[usize]) -> Result<Vec<Tensor>> {
        let len: usize = shape.iter().product();
        let mut all = Vec::with_capacity(len * parts.len());
        for p in parts {
            ensure!(p.shape() == shape, "expert linear: task vector {:?}, expected {shape:?}", p.shape());
            all.extend_from_slice(p.host()?);
        }
        let buffer: Arc<dyn Any + Send + Sync> = Arc::new(self.executor.upload(&all)?);
        (0..parts.len())
            .map(|i| {
                let range = DeviceBuffer { device: self.device, buffer: buffer.clone(), offset: i * len, len };
                Tensor::on_device(shape, range)
            })
            .collect()
    }

    fn weights<'w>(&self, w: &'w ExpertLinear) -> Result<ExpertWeights<'w, E::Buffer>> {
        ensure!(w.layout == WeightLayout::OutIn, "expert linear weights not prepared by the CUDA backend");
        Ok(ExpertWeights {
            base: self.buf(&w.base_weight)?,
            base_bias: Some(self.buf(&w.base_bias)?),
            tasks: Some(self.stacked(&w.task_weights)?),
            task_biases: Some(self.stacked(&w.task_biases)?),
            out_features: w.out_features(),
            in_features: w.in_features(),
            experts: w.experts(),
        })
    }

    /// The one merged weight and bias of a single group (batch routing): `W0 + Σ_t c_t·τ_t`, `b0 + Σ_t c_t·β_t`.
    fn merged(&self, w: &ExpertWeights<'_, E::Buffer>, c: &E::Buffer) -> Result<(E::Buffer, E::Buffer)> {
        let (size, out) = (w.out_features * w.in_features, w.out_features);
        let (mw, mb) = (self.executor.zeros(size)?, self.executor.zeros(out)?);
        let tasks = w.tasks.ok_or_else(|| anyhow!("expert linear without task vectors"))?;
        let biases = w.task_biases.ok_or_else(|| anyhow!("expert linear without task biases"))?;
        let bias = w.base_bias.ok_or_else(|| anyhow!("expert linear without a bias"))?;
        k::merge_experts(&self.executor, w.base, tasks, c, size, w.experts, &mw)?;
        k::merge_experts(&self.executor, bias, biases, c, out, w.experts, &mb)?;
        Ok((mw, mb))
    }

    fn dense<'w>(&self, w: &'w LinearWeight, bias: Option<&'w Tensor>) -> Result<ExpertWeights<'w, E::Buffer>> {
        ensure!(w.layout() == WeightLayout::OutIn, "linear weight not prepared by the CUDA backend");
        Ok(ExpertWeights {
            base: self.buf(w.tensor())?,
            base_bias: bias.map(|b| self.buf(b)).transpose()?,
            tasks: None,
            task_biases: None,
            out_features: w.out_features(),
            in_features: w.in_features(),
            experts: 0,
        })
    }

    fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        ensure!(a.shape() == b.shape(), "{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
        Ok(())
    }

    fn bsd(op: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
        ensure!(t.shape().len() == 3, "{op}: expected [B, N, D], got {:?}", t.shape());
        Ok((t.shape()[0], t.shape()[1], t.shape()[2]))
    }
}

impl<E> Backend for CudaBackend<E>
where
    E: Executor + Send + Sync,
    E::Buffer: Send + Sync + 'static,
{
    fn device(&self) -> Device {
        self.device
    }

    fn describe(&self) -> String {
        format!("{} {}", self.device, self.executor.describe())
    }

    fn free_memory(&self) -> Option<u64> {
        self.executor.free_memory()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn upload(&self, tensor: Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("upload", &self.executor);
        if let Storage::Device(_) = tensor.storage() {
            self.buf(&tensor)?;
            return Ok(tensor);
        }
        let buffer = self.executor.upload(tensor.host()?)?;
        let len = tensor.numel();
        Tensor::on_device(
            tensor.shape(),
            DeviceBuffer { device: self.device, buffer: Arc::new(buffer), offset: 0, len },
        )
    }

    fn to_host(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        let _timer = OpTimer::start_queued("to_host", &self.executor);
        match tensor.storage() {
            Storage::Cpu(_) => Ok(tensor.host()?.to_vec()),
            Storage::Device(d) => {
                let buffer =
                    d.buffer.downcast_ref::<E::Buffer>().ok_or_else(|| anyhow!("tensor of another backend"))?;
                let all = self.executor.download(buffer)?;
                Ok(all[d.offset..d.offset + d.len].to_vec())
            }
        }
    }

    /// Keeps PyTorch's `[out, in]`: the kernels read it in that layout.
    fn prepare_linear(&self, weight: Tensor) -> Result<LinearWeight> {
        let _timer = OpTimer::start_queued("prepare_linear", &self.executor);
        ensure!(weight.shape().len() == 2, "linear weight must be 2-D, got {:?}", weight.shape());
        let (out, inp) = (weight.shape()[0], weight.shape()[1]);
        LinearWeight::new(self.upload(weight)?, WeightLayout::OutIn, out, inp)
    }

    fn linear(&self, x: &Tensor, w: &LinearWeight, b: Option<&Tensor>) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("linear", &self.executor);
        let (rows, width) = rows_and_width(x);
        ensure!(
            w.in_features() == width,
            "linear: input width {width} does not match weight {}×{}",
            w.out_features(),
            w.in_features()
        );
        timer.count(flops::product(rows, width, w.out_features()));
        if let Some(b) = b {
            ensure!(
                b.shape() == [w.out_features()],
                "linear: bias {:?} does not match {} outputs",
                b.shape(),
                w.out_features()
            );
        }
        let y = self.alloc(&with_last(x.shape(), w.out_features()))?;
        self.forward_product(self.buf(x)?, 1, rows, &self.dense(w, b)?, None, None, self.buf(&y)?)?;
        Ok(y)
    }

    fn linear_act(&self, x: &Tensor, w: &LinearWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("linear_act", &self.executor);
        let (rows, width) = rows_and_width(x);
        ensure!(w.in_features() == width, "linear: input width {width} does not match {}", w.in_features());
        timer.count(flops::product(rows, width, w.out_features()));
        if self.precision != Precision::F32 {
            return self.activation(self.linear(x, w, b)?, act);
        }
        let y = self.alloc(&with_last(x.shape(), w.out_features()))?;
        self.forward_product(self.buf(x)?, 1, rows, &self.dense(w, b)?, None, Some(act), self.buf(&y)?)?;
        Ok(y)
    }

    fn router_head(&self, h: &Tensor, w: &LinearWeight, b: &Tensor, softmax: bool) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("router_head", &self.executor);
        let (batch, tokens, hidden) = Self::bsd("router_head", h)?;
        ensure!(w.in_features() == hidden, "router_head: input width {hidden} does not match {}", w.in_features());
        ensure!(w.layout() == WeightLayout::OutIn, "router_head: weight not prepared by the CUDA backend");
        let experts = w.out_features();
        timer.count(flops::product(batch * tokens, hidden, experts));
        if experts > 32 {
            // The fused head keeps one expert per lane.
            return self.router_reduce(&self.linear(h, w, Some(b))?, softmax);
        }
        let out = self.alloc(&[batch, experts])?;
        k::router_head_forward(
            &self.executor,
            self.buf(h)?,
            self.buf(w.tensor())?,
            self.buf(b)?,
            batch,
            tokens,
            hidden,
            experts,
            softmax,
            None,
            self.buf(&out)?,
        )?;
        Ok(out)
    }

    fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("layer_norm", &self.executor);
        let (rows, width) = rows_and_width(x);
        ensure!(
            weight.shape() == [width] && bias.shape() == [width],
            "layer_norm: weight/bias do not match width {width}"
        );
        let y = self.alloc(x.shape())?;
        k::layer_norm_forward(
            &self.executor,
            self.buf(x)?,
            self.buf(weight)?,
            self.buf(bias)?,
            rows,
            width,
            eps,
            self.buf(&y)?,
        )?;
        Ok(y)
    }

    fn attention(&self, q: &Tensor, kk: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("attention", &self.executor);
        Self::same_shape("attention", q, kk)?;
        Self::same_shape("attention", q, v)?;
        let (b, n, d) = Self::bsd("attention", q)?;
        timer.count(flops::attention(b, n, d));
        let out = self.alloc(q.shape())?;
        k::attention_forward(
            &self.executor,
            self.buf(q)?,
            self.buf(kk)?,
            self.buf(v)?,
            b,
            n,
            d,
            heads,
            self.buf(&out)?,
        )?;
        Ok(out)
    }

    fn activation(&self, x: Tensor, act: Activation) -> Result<Tensor> {
        self.activated(&x, act)
    }

    /// The kernel writes a new buffer anyway, so the input needs no copy.
    fn activated(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("activation", &self.executor);
        let y = self.alloc(x.shape())?;
        k::activation_forward(&self.executor, self.buf(x)?, x.numel(), act, self.buf(&y)?)?;
        Ok(y)
    }

    fn add(&self, a: Tensor, b: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("add", &self.executor);
        Self::same_shape("add", &a, b)?;
        k::add_in_place(&self.executor, self.buf(&a)?, self.buf(b)?, a.numel())?;
        Ok(a)
    }

    fn patch_embed(
        &self,
        pixels: &Tensor,
        weight: &Tensor,
        class_embedding: &Tensor,
        position: &Tensor,
    ) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("patch_embed", &self.executor);
        let (ps, ws) = (pixels.shape(), weight.shape());
        ensure!(ps.len() == 4 && ps[2] == ps[3], "patch_embed: pixels must be [B, C, S, S], got {ps:?}");
        ensure!(
            ws.len() == 4 && ws[1] == ps[1] && ws[2] == ws[3],
            "patch_embed: weight {ws:?} does not fit pixels {ps:?}"
        );
        let (batch, channels, image, patch, width) = (ps[0], ps[1], ps[2], ws[2], ws[0]);
        ensure!(patch > 0 && image % patch == 0, "patch_embed: image {image} is not a multiple of patch {patch}");
        let tokens = (image / patch) * (image / patch) + 1;
        timer.count(flops::product(batch * (tokens - 1), channels * patch * patch, width));
        ensure!(class_embedding.shape() == [width], "patch_embed: class embedding {:?}", class_embedding.shape());
        ensure!(
            position.shape() == [tokens, width],
            "patch_embed: position embedding {:?} for {tokens} tokens",
            position.shape()
        );
        let out = self.alloc(&[batch, tokens, width])?;
        k::patch_embed(
            &self.executor,
            self.buf(pixels)?,
            self.buf(weight)?,
            self.buf(class_embedding)?,
            self.buf(position)?,
            (batch, channels, image, patch, width),
            self.buf(&out)?,
        )?;
        Ok(out)
    }

    fn select_token(&self, x: &Tensor, index: usize) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("select_token", &self.executor);
        let (b, n, d) = Self::bsd("select_token", x)?;
        let out = self.alloc(&[b, d])?;
        k::select_token(&self.executor, self.buf(x)?, b, n, d, index, false, self.buf(&out)?)?;
        Ok(out)
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("l2_normalize", &self.executor);
        let (rows, width) = rows_and_width(x);
        let y = self.alloc(x.shape())?;
        k::l2_normalize(&self.executor, self.buf(x)?, None, rows, width, self.buf(&y)?)?;
        Ok(y)
    }

    fn scale(&self, x: &Tensor, factor: f32) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("scale", &self.executor);
        let y = self.alloc(x.shape())?;
        k::scale(&self.executor, self.buf(x)?, x.numel(), factor, self.buf(&y)?)?;
        Ok(y)
    }

    /// Keeps `[out, in]` and stacks the task vectors into one buffer `[T, out, in]` (and `[T, out]`), the
    /// layout the fused kernels read.
    fn prepare_expert_linear(
        &self,
        base_weight: Tensor,
        base_bias: Tensor,
        task_weights: Vec<Tensor>,
        task_biases: Vec<Tensor>,
    ) -> Result<ExpertLinear> {
        let _timer = OpTimer::start_queued("prepare_expert_linear", &self.executor);
        ensure!(base_weight.shape().len() == 2, "expert weight must be 2-D, got {:?}", base_weight.shape());
        let weight_shape = base_weight.shape().to_vec();
        let bias_shape = base_bias.shape().to_vec();
        let tasks = self.upload_stacked(&task_weights, &weight_shape)?;
        let biases = self.upload_stacked(&task_biases, &bias_shape)?;
        ExpertLinear::new(self.upload(base_weight)?, self.upload(base_bias)?, tasks, biases, WeightLayout::OutIn)
    }

    fn expert_linear(&self, x: &Tensor, coefficients: &Tensor, w: &ExpertLinear) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("expert_linear", &self.executor);
        let (rows, width) = rows_and_width(x);
        ensure!(width == w.in_features(), "expert_linear: input width {width} does not match {}", w.in_features());
        timer.count(flops::product(rows, width, w.out_features()));
        let cs = coefficients.shape();
        ensure!(
            cs.len() == 2 && cs[1] == w.experts(),
            "expert_linear: coefficients {cs:?} are not [G, {}]",
            w.experts()
        );
        let groups = cs[0];
        ensure!(groups > 0 && rows % groups == 0, "expert_linear: {rows} rows do not split into {groups} groups");
        let y = self.alloc(&with_last(x.shape(), w.out_features()))?;
        let weights = self.weights(w)?;
        let c = self.buf(coefficients)?;
        if groups == 1 {
            // One merge for the whole batch (batch routing): merging once and multiplying densely beats
            // re-merging in every row tile (BENCHMARKS.md, H200: 2.5–2.8×).
            let (mw, mb) = self.merged(&weights, c)?;
            let dense = ExpertWeights {
                base: &mw,
                base_bias: Some(&mb),
                tasks: None,
                task_biases: None,
                experts: 0,
                ..weights
            };
            self.forward_product(self.buf(x)?, 1, rows, &dense, None, None, self.buf(&y)?)?;
        } else {
            self.forward_product(self.buf(x)?, groups, rows / groups, &weights, Some(c), None, self.buf(&y)?)?;
        }
        Ok(y)
    }

    fn router_reduce(&self, logits: &Tensor, softmax: bool) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("router_reduce", &self.executor);
        let (b, n, t) = Self::bsd("router_reduce", logits)?;
        let w = self.alloc(&[b, t])?;
        k::router_reduce(&self.executor, self.buf(logits)?, b, n, t, softmax, self.buf(&w)?)?;
        Ok(w)
    }

    fn mean_rows(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("mean_rows", &self.executor);
        let (rows, width) = rows_and_width(x);
        let out = self.alloc(&[1, width])?;
        k::mean_rows(&self.executor, self.buf(x)?, rows, width, self.buf(&out)?)?;
        Ok(out)
    }

    fn copy(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("copy", &self.executor);
        let y = self.alloc(x.shape())?;
        k::copy(&self.executor, self.buf(x)?, x.numel(), self.buf(&y)?)?;
        Ok(y)
    }

    fn linear_backward_input(&self, dy: &Tensor, w: &LinearWeight) -> Result<Tensor> {
        let mut timer = OpTimer::start_queued("linear_backward_input", &self.executor);
        let (rows, n) = rows_and_width(dy);
        ensure!(n == w.out_features(), "linear_backward_input: gradient width {n} for {} outputs", w.out_features());
        timer.count(flops::product(rows, n, w.in_features()));
        let dx = self.alloc(&with_last(dy.shape(), w.in_features()))?;
        self.input_product(self.buf(dy)?, 1, rows, &self.dense(w, None)?, None, self.buf(&dx)?)?;
        Ok(dx)
    }

    fn linear_backward_weight(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut timer = OpTimer::start_queued("linear_backward_weight", &self.executor);
        let ((m, inp), (m2, out)) = (rows_and_width(x), rows_and_width(dy));
        ensure!(m == m2, "linear_backward_weight: {m} input rows, {m2} gradient rows");
        timer.count(flops::product(m, inp, out));
        let (dw, db) = (self.alloc(&[out, inp])?, self.alloc(&[out])?);
        k::linear_backward_weight(
            &self.executor,
            self.buf(x)?,
            self.buf(dy)?,
            m,
            inp,
            out,
            self.buf(&dw)?,
            Some(self.buf(&db)?),
        )?;
        Ok((dw, db))
    }

    fn layer_norm_backward(&self, x: &Tensor, weight: &Tensor, eps: f32, dy: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("layer_norm_backward", &self.executor);
        Self::same_shape("layer_norm_backward", x, dy)?;
        let (rows, width) = rows_and_width(x);
        let dx = self.alloc(x.shape())?;
        k::layer_norm_backward(
            &self.executor,
            self.buf(x)?,
            self.buf(weight)?,
            self.buf(dy)?,
            rows,
            width,
            eps,
            self.buf(&dx)?,
        )?;
        Ok(dx)
    }

    fn layer_norm_backward_params(&self, x: &Tensor, eps: f32, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let _timer = OpTimer::start_queued("layer_norm_backward_params", &self.executor);
        Self::same_shape("layer_norm_backward_params", x, dy)?;
        let (rows, width) = rows_and_width(x);
        let (dw, db) = (self.alloc(&[width])?, self.alloc(&[width])?);
        let e = &self.executor;
        k::layer_norm_param_grads(e, self.buf(x)?, self.buf(dy)?, rows, width, eps, self.buf(&dw)?, self.buf(&db)?)?;
        Ok((dw, db))
    }

    fn patch_embed_backward(
        &self,
        pixels: &Tensor,
        weight_shape: &[usize],
        d_tokens: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut timer = OpTimer::start_queued("patch_embed_backward", &self.executor);
        let g = patch_backward_geometry(pixels, weight_shape, d_tokens)?;
        timer.count(flops::product(g.batch * g.grid() * g.grid(), g.channels * g.patch * g.patch, g.width));
        let (dw, d_class, d_position) =
            (self.alloc(weight_shape)?, self.alloc(&[g.width])?, self.alloc(&[g.tokens(), g.width])?);
        k::patch_embed_backward(
            &self.executor,
            self.buf(pixels)?,
            self.buf(d_tokens)?,
            (g.batch, g.channels, g.image, g.patch, g.width),
            self.buf(&dw)?,
            self.buf(&d_class)?,
            self.buf(&d_position)?,
        )?;
        Ok((dw, d_class, d_position))
    }

    fn hold_task_vectors(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let _timer = OpTimer::start_queued("hold_task_vectors", &self.executor);
        match parts.first() {
            Some(first) => self.upload_stacked(&parts, first.shape()),
            None => Ok(parts),
        }
    }

    fn merge_task_vectors(&self, base: &Tensor, tasks: &[Tensor], lambdas: &[f32]) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("merge_task_vectors", &self.executor);
        check_merge(base, tasks, lambdas)?;
        if tasks.is_empty() {
            return self.copy(base);
        }
        let e = &self.executor;
        let out = self.alloc(base.shape())?;
        let lambdas_on_device = e.upload(lambdas)?;
        let n = base.numel();
        k::merge_rounded(
            e,
            self.buf(base)?,
            self.stacked(tasks)?,
            &lambdas_on_device,
            n,
            tasks.len(),
            self.buf(&out)?,
        )?;
        Ok(out)
    }

    fn task_vector_dots(&self, tasks: &[Tensor], g: &Tensor) -> Result<Vec<f32>> {
        let _timer = OpTimer::start_queued("task_vector_dots", &self.executor);
        check_task_vectors("task_vector_dots", g, tasks)?;
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let e = &self.executor;
        let out = e.zeros(tasks.len())?;
        k::task_vector_dots(e, self.stacked(tasks)?, self.buf(g)?, g.numel(), tasks.len(), &out)?;
        e.download(&out)
    }

    fn activation_backward(&self, z: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("activation_backward", &self.executor);
        Self::same_shape("activation_backward", z, dy)?;
        let dz = self.alloc(z.shape())?;
        k::activation_backward(&self.executor, self.buf(z)?, self.buf(dy)?, z.numel(), act, self.buf(&dz)?)?;
        Ok(dz)
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut timer = OpTimer::start_queued("attention_backward", &self.executor);
        Self::same_shape("attention_backward", q, d_out)?;
        let (b, n, d) = Self::bsd("attention_backward", q)?;
        timer.count(flops::attention_backward(b, n, d));
        let (dq, dk, dv) = (self.alloc(q.shape())?, self.alloc(q.shape())?, self.alloc(q.shape())?);
        k::attention_backward(
            &self.executor,
            self.buf(q)?,
            self.buf(kk)?,
            self.buf(v)?,
            self.buf(d_out)?,
            b,
            n,
            d,
            heads,
            (self.buf(&dq)?, self.buf(&dk)?, self.buf(&dv)?),
        )?;
        Ok((dq, dk, dv))
    }

    fn router_reduce_backward(&self, logits: &Tensor, softmax: bool, dw: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("router_reduce_backward", &self.executor);
        let (b, n, t) = Self::bsd("router_reduce_backward", logits)?;
        ensure!(dw.shape() == [b, t], "router_reduce_backward: gradient {:?} for [{b}, {t}]", dw.shape());
        let dl = self.alloc(logits.shape())?;
        k::router_reduce_backward(&self.executor, self.buf(logits)?, self.buf(dw)?, b, n, t, softmax, self.buf(&dl)?)?;
        Ok(dl)
    }

    fn expert_linear_backward(
        &self,
        x: &Tensor,
        coefficients: &Tensor,
        w: &ExpertLinear,
        dy: &Tensor,
        input_gradient: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let mut timer = OpTimer::start_queued("expert_linear_backward", &self.executor);
        let (rows, _) = rows_and_width(x);
        timer.count(flops::expert_linear_backward(rows, w.in_features(), w.out_features(), input_gradient));
        let groups = coefficients.shape()[0];
        ensure!(groups > 0 && rows % groups == 0, "expert_linear_backward: {rows} rows in {groups} groups");
        let weights = self.weights(w)?;
        let dc = self.alloc(coefficients.shape())?;
        let c = self.buf(coefficients)?;
        let dx = if !input_gradient {
            None
        } else if groups == 1 {
            let dx = self.alloc(x.shape())?;
            let (mw, _) = self.merged(&weights, c)?;
            let dense =
                ExpertWeights { base: &mw, base_bias: None, tasks: None, task_biases: None, experts: 0, ..weights };
            self.input_product(self.buf(dy)?, 1, rows, &dense, None, self.buf(&dx)?)?;
            Some(dx)
        } else {
            let dx = self.alloc(x.shape())?;
            self.input_product(self.buf(dy)?, groups, rows / groups, &weights, Some(c), self.buf(&dx)?)?;
            Some(dx)
        };
        k::expert_linear_backward_coeff(
            &self.executor,
            self.buf(x)?,
            self.buf(dy)?,
            groups,
            rows / groups,
            &weights,
            self.buf(&dc)?,
        )?;
        Ok((dx, dc))
    }

    fn l2_normalize_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("l2_normalize_backward", &self.executor);
        Self::same_shape("l2_normalize_backward", x, dy)?;
        let (rows, width) = rows_and_width(x);
        let dx = self.alloc(x.shape())?;
        k::l2_normalize(&self.executor, self.buf(x)?, Some(self.buf(dy)?), rows, width, self.buf(&dx)?)?;
        Ok(dx)
    }

    fn softmax_entropy(&self, logits: &Tensor) -> Result<(f64, Tensor)> {
        let _timer = OpTimer::start_queued("softmax_entropy", &self.executor);
        let (rows, classes) = rows_and_width(logits);
        let (h, d) = (self.alloc(&[rows])?, self.alloc(logits.shape())?);
        k::softmax_entropy(&self.executor, self.buf(logits)?, rows, classes, self.buf(&h)?, self.buf(&d)?)?;
        let mean = self.to_host(&h)?.iter().map(|&v| v as f64).sum::<f64>() / rows.max(1) as f64;
        Ok((mean, d))
    }

    fn select_token_backward(&self, dy: &Tensor, tokens: usize, index: usize) -> Result<Tensor> {
        let _timer = OpTimer::start_queued("select_token_backward", &self.executor);
        ensure!(dy.shape().len() == 2, "select_token_backward: expected [B, D], got {:?}", dy.shape());
        let (b, d) = (dy.shape()[0], dy.shape()[1]);
        let dx = self.alloc(&[b, tokens, d])?;
        k::select_token(&self.executor, self.buf(dy)?, b, tokens, d, index, true, self.buf(&dx)?)?;
        Ok(dx)
    }
}

impl<E: Executor> DeviceQueue for E {
    fn wait(&self) {
        let _ = self.synchronize();
    }
}
