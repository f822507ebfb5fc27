//! Devices and the backend interface the model runs on.
//!
//! The model is written once against [`Backend`]; each device implements it. The CPU backend is the
//! reference and the fallback; the CUDA backend ([`CudaBackend`]) runs the same operations as kernels.

mod cpu;
mod cuda;
pub mod flops;
pub mod kernel_choice;
pub mod op_times;
mod weights;

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};

pub use cpu::CpuBackend;
pub use cuda::CudaBackend;
pub use kernel_choice::WemoeKernels;
pub use weights::{ExpertLinear, LinearWeight, WeightLayout};

/// The last dimension and the product of the others.
pub(crate) fn rows_and_width(t: &Tensor) -> (usize, usize) {
    let width = t.shape().last().copied().unwrap_or(1);
    (t.numel() / width.max(1), width)
}

/// `shape` with its last dimension set to `last` (an op's output shape from its input's); unchanged when empty.
pub(crate) fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

use crate::tensor::Tensor;

/// A concrete device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The host CPU.
    Cpu,
    /// A CUDA GPU, by ordinal.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => {
                let ordinal = s.strip_prefix("cuda:").and_then(|n| n.parse().ok());
                ordinal
                    .map(DeviceRequest::Cuda)
                    .ok_or_else(|| anyhow!("unknown device '{s}': expected auto, cpu, cuda or cuda:N"))
            }
        }
    }
}

/// The arithmetic of the forward's products (`--precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Exact f32 (the default).
    #[default]
    F32,
    /// Operands rounded to TF32, products accumulated in f32 on tensor cores (sm_80 and later): the forward's
    /// WEMoE and dense linear layers; backward stays f32. Within about 1e-3 of f32.
    Tf32,
    /// Operands rounded to bf16 (7 mantissa bits), products accumulated in f32: on the GPU's tensor cores
    /// (sm_80 and later) or the CPU's AMX tiles (Sapphire Rapids and later) or AVX-512 BF16 dot products (AMD
    /// Zen 4 and later), the same layers as [`Precision::Tf32`]; on the CPU also the backward's products through
    /// frozen weights (dense layers' input gradients, the WEMoE layers' backward). Within about 1e-2 of f32.
    Bf16,
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(anyhow!("unknown precision '{s}': expected f32, tf32 or bf16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// What to compute on, and how: `--device` and `--precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceChoice {
    /// The device asked for.
    pub request: DeviceRequest,
    /// The GPU's arithmetic.
    pub precision: Precision,
}

impl From<DeviceRequest> for DeviceChoice {
    fn from(request: DeviceRequest) -> Self {
        DeviceChoice { request, precision: Precision::F32 }
    }
}

/// The CUDA backend on GPU `ordinal` in f32, or why there is none (no driver, no device, no NVRTC: each named).
fn open_gpu(ordinal: usize) -> Result<CudaBackend<crate::cuda::GpuExecutor>> {
    let executor = crate::cuda::GpuExecutor::new(ordinal)?;
    Ok(CudaBackend::new(executor, Device::Cuda(ordinal)))
}

/// Why a GPU of architecture `arch` (e.g. `sm_75`) cannot compute in `precision`, if it cannot: TF32 and bf16
/// run on the tensor-core kernel, which needs the architecture its source names (sm_80).
pub fn gpu_precision_unsupported(arch: &str, precision: Precision) -> Option<String> {
    if precision == Precision::F32 {
        return None;
    }
    let kernel = crate::kernels::source("expert_linear_mma").expect("the tensor-core kernel is embedded");
    kernel
        .unsupported_on(arch)
        .map(|_| format!("--precision {precision} needs tensor cores of sm_{} or later, not {arch}", kernel.min_arch))
}

/// Opens the backend for `choice` (a [`DeviceRequest`] converts into one, in f32). `auto` takes GPU 0 when
/// it is usable, else the CPU, and says which (and why not the GPU) in one line on stderr unless `quiet`; a GPU
/// without the tensor cores TF32 and bf16 need ([`gpu_precision_unsupported`]) computes in f32 under `auto`, and
/// is refused by `cuda`.
pub fn open(choice: impl Into<DeviceChoice>, quiet: bool) -> Result<Box<dyn Backend>> {
    let DeviceChoice { request, precision } = choice.into();
    match request {
        DeviceRequest::Cpu => Ok(Box::new(CpuBackend::with_precision(precision)?)),
        DeviceRequest::Cuda(i) => {
            let gpu = open_gpu(i).map_err(|e| anyhow!("--device cuda:{i}: {e:#}; use --device cpu"))?;
            if let Some(why) = gpu_precision_unsupported(gpu.executor().arch(), precision) {
                bail!("--device cuda:{i} ({}): {why}; use --precision f32", gpu.describe());
            }
            Ok(Box::new(gpu.with_precision(precision)))
        }
        DeviceRequest::Auto => {
            let backend: Box<dyn Backend> = match open_gpu(0) {
                Ok(gpu) => {
                    // A card without the precision's tensor cores still computes, in f32, and the line says so.
                    let (precision, instead) = match gpu_precision_unsupported(gpu.executor().arch(), precision) {
                        Some(why) => (Precision::F32, format!(": {why}")),
                        None => (precision, String::new()),
                    };
                    if !quiet {
                        eprintln!("device: {} ({precision}{instead})", gpu.describe());
                    }
                    Box::new(gpu.with_precision(precision))
                }
                Err(why) => {
                    // The CPU in the precision asked for where it can, else in f32, and the line says why.
                    let (cpu, instead) = match CpuBackend::with_precision(precision) {
                        Ok(cpu) => (cpu, String::new()),
                        Err(e) => (CpuBackend::new(), format!("; computing in f32: {e:#}")),
                    };
                    if !quiet {
                        eprintln!("device: {} (no GPU: {why:#}{instead})", cpu.describe());
                    }
                    Box::new(cpu)
                }
            };
            Ok(backend)
        }
    }
}

/// The element-wise activations of CLIP's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `z * sigmoid(1.702 z)`, OpenAI CLIP's.
    QuickGelu,
    /// `z * Φ(z)` with the exact normal CDF (HF `gelu`).
    Gelu,
    /// The tanh approximation of GELU (HF `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `max(z, 0)`.
    Relu,
}

/// The geometry of [`Backend::patch_embed_backward`]'s operands, checked.
pub(crate) fn patch_backward_geometry(
    pixels: &Tensor,
    weight_shape: &[usize],
    d_tokens: &Tensor,
) -> Result<crate::ops::patch_embed::PatchGeometry> {
    let (ps, ds) = (pixels.shape(), d_tokens.shape());
    anyhow::ensure!(
        ps.len() == 4
            && weight_shape.len() == 4
            && ds.len() == 3
            && ds[0] == ps[0]
            && ds[2] == weight_shape[0]
            && weight_shape[1] == ps[1]
            && weight_shape[2] > 0,
        "patch_embed_backward: pixels {ps:?}, weight {weight_shape:?} and gradient {ds:?} do not fit"
    );
    let g = crate::ops::patch_embed::PatchGeometry {
        batch: ps[0],
        channels: ps[1],
        image: ps[2],
        patch: weight_shape[2],
        width: weight_shape[0],
    };
    anyhow::ensure!(ds[1] == g.tokens(), "patch_embed_backward: {} tokens, the images make {}", ds[1], g.tokens());
    Ok(g)
}

/// Every task vector has `like`'s shape.
pub(crate) fn check_task_vectors(op: &str, like: &Tensor, tasks: &[Tensor]) -> Result<()> {
    for (t, tau) in tasks.iter().enumerate() {
        anyhow::ensure!(
            tau.shape() == like.shape(),
            "{op}: task vector {t} has shape {:?}, expected {:?}",
            tau.shape(),
            like.shape()
        );
    }
    Ok(())
}

/// [`Backend::merge_task_vectors`]' operands fit: task vectors of the base's shape, a coefficient for each.
pub(crate) fn check_merge(base: &Tensor, tasks: &[Tensor], lambdas: &[f32]) -> Result<()> {
    check_task_vectors("merge_task_vectors", base, tasks)?;
    anyhow::ensure!(
        lambdas.len() == tasks.len(),
        "merge_task_vectors: {} task vectors, {} coefficients",
        tasks.len(),
        lambdas.len()
    );
    Ok(())
}

/// A tensor's values on the host: borrowed where they are there, else downloaded.
fn host_values<'t, B: Backend + ?Sized>(be: &B, t: &'t Tensor) -> Result<std::borrow::Cow<'t, [f32]>> {
    Ok(match t.storage() {
        crate::tensor::Storage::Cpu(_) => std::borrow::Cow::Borrowed(t.host()?),
        crate::tensor::Storage::Device(_) => std::borrow::Cow::Owned(be.to_host(t)?),
    })
}

/// The operations the CLIP vision forward needs, on one device. Every tensor argument must live on
/// this backend's device; shapes are checked and a mismatch is an error naming the operation.
pub trait Backend: Send + Sync {
    /// The device this backend computes on.
    fn device(&self) -> Device;

    /// One line describing the device (name, threads, instruction set).
    fn describe(&self) -> String;

    /// Bytes of device memory free now, on a device with memory of its own (a GPU); `None` on the CPU.
    fn free_memory(&self) -> Option<u64> {
        None
    }

    /// The arithmetic of its forward's products (`--precision`); what a checkpoint records of its run.
    fn precision(&self) -> Precision;

    /// Moves a host tensor onto this device (a no-op on the CPU).
    fn upload(&self, tensor: Tensor) -> Result<Tensor>;

    /// Copies a tensor's elements back to the host.
    fn to_host(&self, tensor: &Tensor) -> Result<Vec<f32>>;

    /// Moves a host weight stored `[out, in]` (PyTorch's Linear layout) onto this device, in the layout
    /// this backend's [`linear`](Backend::linear) is fastest with.
    fn prepare_linear(&self, weight: Tensor) -> Result<LinearWeight>;

    /// `x · wᵀ + b` over the last axis of `x`.
    fn linear(&self, x: &Tensor, w: &LinearWeight, b: Option<&Tensor>) -> Result<Tensor>;

    /// LayerNorm over the last axis with affine `weight` and `bias`.
    fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor>;

    /// Multi-head scaled dot-product attention: `q`, `k`, `v` are `[B, N, D]`, heads split `D`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor>;

    /// An element-wise activation; takes `x` so that its buffer can be reused.
    fn activation(&self, x: Tensor, act: Activation) -> Result<Tensor>;

    /// The activation of `x` into a new tensor, `x` kept (the tape saves it for the backward). By default a
    /// copy activated in place; a backend with an out-of-place pass saves one read and write of every value.
    fn activated(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.activation(self.copy(x)?, act)
    }

    /// Element-wise `a + b` of equal shapes; takes `a` so that its buffer can be reused.
    fn add(&self, a: Tensor, b: &Tensor) -> Result<Tensor>;

    /// CLIP's embeddings: the non-overlapping patch convolution (no bias) of `pixels` `[B, C, S, S]`
    /// with `weight` `[D, C, P, P]`, the class token prepended, and the position embedding `[N, D]` added.
    fn patch_embed(
        &self,
        pixels: &Tensor,
        weight: &Tensor,
        class_embedding: &Tensor,
        position_embedding: &Tensor,
    ) -> Result<Tensor>;

    /// Token `index` of every sample: `[B, N, D]` to `[B, D]`.
    fn select_token(&self, x: &Tensor, index: usize) -> Result<Tensor>;

    /// Each row divided by its L2 norm (rows of zeros stay zero).
    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor>;

    /// Every element times `factor`.
    fn scale(&self, x: &Tensor, factor: f32) -> Result<Tensor>;

    /// Moves a WEMoE linear layer's host weights (PyTorch's `[out, in]`, biases `[out]`) onto this device, in
    /// the layout this backend's [`expert_linear`](Backend::expert_linear) is fastest with.
    fn prepare_expert_linear(
        &self,
        base_weight: Tensor,
        base_bias: Tensor,
        task_weights: Vec<Tensor>,
        task_biases: Vec<Tensor>,
    ) -> Result<ExpertLinear>;

    /// WEMoE's linear layer: `coefficients` is `[G, T]` and `x` holds G equal groups of rows
    /// (`[G, N, in]` for per-sample routing, any `[.., in]` with G = 1 for batch routing); each group is
    /// multiplied by its own merged weight `W0 + Σ_t c[g,t] τ_t` (and bias), never stored whole.
    fn expert_linear(&self, x: &Tensor, coefficients: &Tensor, w: &ExpertLinear) -> Result<Tensor>;

    /// A WEMoE MLP: `fc2(act(fc1(x)))`, both layers merged by `coefficients` as in
    /// [`expert_linear`](Backend::expert_linear) (the forward without a tape: `embed` and `eval`). Fused where a
    /// backend can: the CPU backend keeps the hidden layer in its tiles' layout, in either routing.
    fn expert_mlp(
        &self,
        x: &Tensor,
        coefficients: &Tensor,
        fc1: &ExpertLinear,
        fc2: &ExpertLinear,
        act: Activation,
    ) -> Result<Tensor> {
        expert_mlp_in_steps(self, x, coefficients, fc1, fc2, act)
    }

    /// The router's reduction: `[B, N, T]` per-token outputs, softmaxed over experts when `softmax`, averaged
    /// over tokens: `[B, T]`.
    fn router_reduce(&self, logits: &Tensor, softmax: bool) -> Result<Tensor>;

    /// `act(x · wᵀ + b)`: a linear layer and its activation, fused where a backend can (the CUDA backend applies
    /// the activation in the GEMM's epilogue).
    fn linear_act(&self, x: &Tensor, w: &LinearWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        self.activation(self.linear(x, w, b)?, act)
    }

    /// A router's last layer and its reduction: [`router_reduce`](Backend::router_reduce) of `h · wᵀ + b` for
    /// `h` `[B, N, H]` and `w` `[T, H]`; one kernel on the CUDA backend (the per-token outputs never leave the
    /// chip).
    fn router_head(&self, h: &Tensor, w: &LinearWeight, b: &Tensor, softmax: bool) -> Result<Tensor> {
        self.router_reduce(&self.linear(h, w, Some(b))?, softmax)
    }

    /// The mean over rows: `[B, W]` to `[1, W]`.
    fn mean_rows(&self, x: &Tensor) -> Result<Tensor>;

    /// A copy of `x` on this device (a value a backward step keeps while the forward goes on with it).
    fn copy(&self, x: &Tensor) -> Result<Tensor>;

    /// Backward of [`linear`](Backend::linear) with respect to its input: `dy · w`, shaped like the input.
    fn linear_backward_input(&self, dy: &Tensor, w: &LinearWeight) -> Result<Tensor>;

    /// Backward of [`linear`](Backend::linear) with respect to a trainable weight and bias: `(dyᵀ·x, Σ dy)`,
    /// the weight gradient in PyTorch's `[out, in]` layout.
    fn linear_backward_weight(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Backward of [`layer_norm`](Backend::layer_norm) with respect to its input (frozen affine parameters).
    fn layer_norm_backward(&self, x: &Tensor, weight: &Tensor, eps: f32, dy: &Tensor) -> Result<Tensor>;

    /// Backward of [`layer_norm`](Backend::layer_norm) with respect to its affine parameters:
    /// `(d weight, d bias)`, each `[D]`. By default computed on the host from downloaded operands: it is a
    /// reduction over rows, small beside the products around it.
    fn layer_norm_backward_params(&self, x: &Tensor, eps: f32, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let _timer = op_times::OpTimer::start("layer_norm_backward_params");
        anyhow::ensure!(
            x.shape() == dy.shape(),
            "layer_norm_backward_params: input {:?} and gradient {:?} differ",
            x.shape(),
            dy.shape()
        );
        let (_, width) = rows_and_width(x);
        let (dw, db) =
            crate::ops::layer_norm::layer_norm_backward_params(&self.to_host(x)?, width, eps, &self.to_host(dy)?);
        Ok((self.upload(Tensor::from_vec(&[width], dw)?)?, self.upload(Tensor::from_vec(&[width], db)?)?))
    }

    /// Backward of [`patch_embed`](Backend::patch_embed) with respect to its parameters, from the tokens'
    /// gradient `[B, N, D]`: `(d weight [D, C, P, P], d class_embedding [D], d position_embedding [N, D])`. By
    /// default on the host, as [`layer_norm_backward_params`](Backend::layer_norm_backward_params).
    fn patch_embed_backward(
        &self,
        pixels: &Tensor,
        weight_shape: &[usize],
        d_tokens: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut timer = op_times::OpTimer::start("patch_embed_backward");
        let g = patch_backward_geometry(pixels, weight_shape, d_tokens)?;
        timer.count(flops::product(g.batch * g.grid() * g.grid(), g.channels * g.patch * g.patch, g.width));
        let (dw, dc, dp) =
            crate::ops::patch_embed::patch_embed_backward(&self.to_host(pixels)?, &self.to_host(d_tokens)?, g)?;
        Ok((
            self.upload(Tensor::from_vec(weight_shape, dw)?)?,
            self.upload(Tensor::from_vec(&[g.width], dc)?)?,
            self.upload(Tensor::from_vec(&[g.tokens(), g.width], dp)?)?,
        ))
    }

    /// Task vectors held on this device for [`merge_task_vectors`](Backend::merge_task_vectors) and
    /// [`task_vector_dots`](Backend::task_vector_dots), which layer-wise AdaMerging runs on them at every
    /// step: `parts`, all of one shape, in the layout those take. By default each uploaded as it is.
    fn hold_task_vectors(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        parts.into_iter().map(|p| self.upload(p)).collect()
    }

    /// `base + Σ_t lambdas[t]·tasks[t]`, the experts added in order and each product rounded before its sum,
    /// the bits torch's `state_dict[name] + param * w` gives. By default on the host.
    fn merge_task_vectors(&self, base: &Tensor, tasks: &[Tensor], lambdas: &[f32]) -> Result<Tensor> {
        let _timer = op_times::OpTimer::start("merge_task_vectors");
        check_merge(base, tasks, lambdas)?;
        let base_values = host_values(self, base)?;
        let values = tasks.iter().map(|t| host_values(self, t)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[f32]> = values.iter().map(|v| v.as_ref()).collect();
        let merged = crate::ops::task_vectors::merge_rounded(&base_values, &refs, lambdas);
        self.upload(Tensor::from_vec(base.shape(), merged)?)
    }

    /// `⟨tasks[t], g⟩` for every task vector, summed in f64. By default on the host.
    fn task_vector_dots(&self, tasks: &[Tensor], g: &Tensor) -> Result<Vec<f32>> {
        let _timer = op_times::OpTimer::start("task_vector_dots");
        check_task_vectors("task_vector_dots", g, tasks)?;
        let g = host_values(self, g)?;
        let values = tasks.iter().map(|t| host_values(self, t)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[f32]> = values.iter().map(|v| v.as_ref()).collect();
        Ok(crate::ops::task_vectors::task_vector_dots(&refs, &g))
    }

    /// Backward of [`activation`](Backend::activation) from the pre-activation `z`.
    fn activation_backward(&self, z: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor>;

    /// Backward of [`attention`](Backend::attention): `(dq, dk, dv)`, recomputing the probabilities.
    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_out: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Tensor, Tensor)>;

    /// Backward of [`router_reduce`](Backend::router_reduce): the per-token outputs' gradient `[B, N, T]`.
    fn router_reduce_backward(&self, logits: &Tensor, softmax: bool, dw: &Tensor) -> Result<Tensor>;

    /// Backward of [`expert_linear`](Backend::expert_linear): `(dx, dcoefficients)`, `dx` only when
    /// `input_gradient` (an input that depends on no parameter, as the first WEMoE layer's, skips its product).
    fn expert_linear_backward(
        &self,
        x: &Tensor,
        coefficients: &Tensor,
        w: &ExpertLinear,
        dy: &Tensor,
        input_gradient: bool,
    ) -> Result<(Option<Tensor>, Tensor)>;

    /// Backward of [`l2_normalize`](Backend::l2_normalize).
    fn l2_normalize_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor>;

    /// The batch-mean softmax entropy of `[B, C]` logits and its gradient.
    fn softmax_entropy(&self, logits: &Tensor) -> Result<(f64, Tensor)>;

    /// Backward of [`select_token`](Backend::select_token): `[B, D]` scattered into zeros `[B, tokens, D]`.
    fn select_token_backward(&self, dy: &Tensor, tokens: usize, index: usize) -> Result<Tensor>;
}

/// [`Backend::expert_mlp`] as its three steps: [`Backend::expert_linear`], [`Backend::activation`],
/// [`Backend::expert_linear`] (each timed as itself).
pub(crate) fn expert_mlp_in_steps<B: Backend + ?Sized>(
    be: &B,
    x: &Tensor,
    coefficients: &Tensor,
    fc1: &ExpertLinear,
    fc2: &ExpertLinear,
    act: Activation,
) -> Result<Tensor> {
    let hidden = be.activation(be.expert_linear(x, coefficients, fc1)?, act)?;
    be.expert_linear(&hidden, coefficients, fc2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_core_precisions_need_the_architecture_their_kernel_names() {
        let refused = |arch: &str, p: Precision| gpu_precision_unsupported(arch, p);
        assert_eq!(
            refused("sm_75", Precision::Bf16).as_deref(),
            Some("--precision bf16 needs tensor cores of sm_80 or later, not sm_75")
        );
        assert!(refused("sm_75", Precision::Tf32).is_some());
        for arch in ["sm_80", "sm_86", "sm_90a", "sm_100", "sm_120"] {
            assert_eq!(refused(arch, Precision::Bf16), None, "{arch}");
            assert_eq!(refused(arch, Precision::Tf32), None, "{arch}");
        }
        assert_eq!(refused("sm_75", Precision::F32), None);
    }
}
