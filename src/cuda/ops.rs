//! One launch wrapper per kernel: shapes checked against the buffers, grid and block chosen, arguments in
//! the kernel's order. Generic over the [`Executor`], so the code that the GPU runs is the code that the
//! host emulation proves in `cargo test`.

use anyhow::{ensure, Result};

use super::launch::{int, Arg, Dims, Executor};
use crate::device::Activation;

/// Rows and columns of every tiled kernel's tiles (EL_BM, EL_BN, EG_TILE in kernels/).
const TILE: usize = 64;
/// Columns of expert_linear_wide.cu's tiles (EW_BN).
const WIDE_TILE: usize = 128;
const MAX_EXPERTS: usize = 64;
/// Rows of a LayerNorm parameter gradient's partial sums (LN_CHUNK in kernels/layer_norm.cu).
const LN_CHUNK: usize = 256;
/// Values of a task-vector dot's partial sums (DOT_CHUNK in kernels/task_vectors.cu).
const DOT_CHUNK: usize = 256 * 32;

/// The code `kernels/common.cuh` gives an activation (0: none).
pub fn act_code(act: Option<Activation>) -> i32 {
    match act {
        None => 0,
        Some(Activation::QuickGelu) => 1,
        Some(Activation::Gelu) => 2,
        Some(Activation::GeluTanh) => 3,
        Some(Activation::Relu) => 4,
    }
}

fn need<E: Executor>(e: &E, b: &E::Buffer, len: usize, what: &str) -> Result<()> {
    ensure!(e.len(b) >= len, "{what}: buffer of {} values, {len} needed", e.len(b));
    Ok(())
}

fn opt<'a, B>(b: Option<&'a B>) -> Arg<'a, B> {
    b.map_or(Arg::Null, Arg::Buf)
}

/// Checks the buffers of a forward variant (`name` for errors); false when there are no rows.
#[allow(clippy::too_many_arguments)]
fn check_forward<E: Executor>(
    e: &E,
    name: &str,
    x: &E::Buffer,
    routes: usize,
    rows_per_route: usize,
    w: &ExpertWeights<E::Buffer>,
    coeff: Option<&E::Buffer>,
    y: &E::Buffer,
) -> Result<bool> {
    w.check(e)?;
    let rows = routes * rows_per_route;
    need(e, x, rows * w.in_features, &format!("{name} x"))?;
    need(e, y, rows * w.out_features, &format!("{name} y"))?;
    if w.experts > 0 {
        let c = coeff.ok_or_else(|| anyhow::anyhow!("{name}: no coefficients"))?;
        need(e, c, routes * w.experts, &format!("{name} coefficients"))?;
    }
    Ok(rows > 0)
}

/// The weight arguments of every forward variant, in their order: W0, τ, b0, β, coefficients (τ, β and the
/// coefficients null for a plain linear layer, β null without a bias).
fn weight_args<'a, B>(w: &ExpertWeights<'a, B>, coeff: Option<&'a B>) -> [Arg<'a, B>; 5] {
    let experts = w.experts > 0;
    [
        Arg::Buf(w.base),
        opt(if experts { w.tasks } else { None }),
        opt(w.base_bias),
        opt(if experts && w.base_bias.is_some() { w.task_biases } else { None }),
        opt(if experts { coeff } else { None }),
    ]
}

/// The trailing integer arguments of every forward variant.
fn shape_args<'a, B>(rows_per_route: usize, w: &ExpertWeights<B>, act: Option<Activation>) -> Result<[Arg<'a, B>; 5]> {
    Ok([
        Arg::I32(int(rows_per_route, "rows per route")?),
        Arg::I32(int(w.in_features, "in features")?),
        Arg::I32(int(w.out_features, "out features")?),
        Arg::I32(w.experts as i32),
        Arg::I32(act_code(act)),
    ])
}

/// A WEMoE linear layer's weights on a device, in PyTorch's `[out, in]` layout: `base` W0, `tasks` τ
/// `[T, out, in]`, biases `[out]` and `[T, out]`. With `experts == 0` it is a plain linear layer.
pub struct ExpertWeights<'a, B> {
    /// W0 `[out, in]`.
    pub base: &'a B,
    /// b0 `[out]`, if the layer has a bias.
    pub base_bias: Option<&'a B>,
    /// τ `[T, out, in]` (ignored when `experts == 0`).
    pub tasks: Option<&'a B>,
    /// β `[T, out]` (with `base_bias`).
    pub task_biases: Option<&'a B>,
    /// Output width.
    pub out_features: usize,
    /// Input width.
    pub in_features: usize,
    /// T.
    pub experts: usize,
}

impl<B> ExpertWeights<'_, B> {
    fn check<E: Executor<Buffer = B>>(&self, e: &E) -> Result<()> {
        let size = self.out_features * self.in_features;
        ensure!(
            self.experts <= MAX_EXPERTS,
            "expert linear: {} experts, the kernels take at most {MAX_EXPERTS}",
            self.experts
        );
        need(e, self.base, size, "expert linear W0")?;
        if let Some(b) = self.base_bias {
            need(e, b, self.out_features, "expert linear b0")?;
        }
        if self.experts > 0 {
            let tasks =
                self.tasks.ok_or_else(|| anyhow::anyhow!("expert linear: {} experts but no τ", self.experts))?;
            need(e, tasks, self.experts * size, "expert linear τ")?;
            if self.base_bias.is_some() {
                let tb = self.task_biases.ok_or_else(|| anyhow::anyhow!("expert linear: bias but no task biases"))?;
                need(e, tb, self.experts * self.out_features, "expert linear β")?;
            }
        }
        Ok(())
    }
}

/// `y = act(x·W_rᵀ + b_r)` per route of `rows_per_route` rows, W_r merged on chip from `coeff` `[routes, T]`;
/// `pre` (if given) receives the pre-activation.
#[allow(clippy::too_many_arguments)]
pub fn expert_linear_forward<E: Executor>(
    e: &E,
    x: &E::Buffer,
    routes: usize,
    rows_per_route: usize,
    w: &ExpertWeights<E::Buffer>,
    coeff: Option<&E::Buffer>,
    act: Option<Activation>,
    pre: Option<&E::Buffer>,
    y: &E::Buffer,
) -> Result<()> {
    expert_linear_forward_by(e, ForwardKernel::Direct, x, routes, rows_per_route, w, coeff, act, pre, y)
}

/// The operands of the tensor-core forward (`--precision tf32|bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaOperands {
    /// TF32, 10 mantissa bits (`mma.sync.m16n8k8`).
    Tf32,
    /// bf16, 7 mantissa bits (`mma.sync.m16n8k16`).
    Bf16,
}

impl MmaOperands {
    /// The kernel of kernels/expert_linear_mma.cu.
    fn kernel(self) -> &'static str {
        match self {
            MmaOperands::Tf32 => "expert_linear_forward_tf32",
            MmaOperands::Bf16 => "expert_linear_forward_bf16",
        }
    }
}

/// [`expert_linear_forward`] on tensor cores: `x` and each merged weight rounded to `operands` on chip,
/// products accumulated in f32 (kernels/expert_linear_mma.cu; sm_80 and later).
#[allow(clippy::too_many_arguments)]
pub fn expert_linear_forward_mma<E: Executor>(
    e: &E,
    operands: MmaOperands,
    x: &E::Buffer,
    routes: usize,
    rows_per_route: usize,
    w: &ExpertWeights<E::Buffer>,
    coeff: Option<&E::Buffer>,
    act: Option<Activation>,
    y: &E::Buffer,
) -> Result<()> {
    let kernel = operands.kernel();
    if !check_forward(e, kernel, x, routes, rows_per_route, w, coeff, y)? {
        return Ok(());
    }
    let dims = Dims {
        grid: (routes as u32, rows_per_route.div_ceil(TILE) as u32, w.out_features.div_ceil(TILE) as u32),
        block: (128, 1, 1),
    };
    let mut args = vec![Arg::Buf(x)];
    args.extend(weight_args(w, coeff));
    args.push(Arg::Buf(y));
    args.extend(shape_args(rows_per_route, w, act)?);
    e.launch(kernel, dims, &args)
}

/// The kernels that compute [`expert_linear_forward`] per route in f32: the same products, interchangeable;
/// which is fastest depends on the card and the shape (the CUDA backend measures them, `WemoeKernels::Tuned`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKernel {
    /// kernels/expert_linear.cu: one route per block, sources loaded as they merge.
    Direct,
    /// kernels/expert_linear_grouped.cu: 2 or 4 routes per block sharing each load of the sources.
    Grouped(usize),
    /// kernels/expert_linear_staged.cu: 1 or 2 routes per block, each thread staging its pieces of the
    /// coming source tiles by `cp.async` into its own ring of shared-memory slots (sm_80+).
    Staged(usize),
    /// kernels/expert_linear_wide.cu: 64 × 128 tiles, float4 operand reads, sources staged (sm_80+).
    Wide,
}

impl ForwardKernel {
    /// Every candidate for a per-sample (several routes) product with experts.
    pub const CANDIDATES: [ForwardKernel; 6] = [
        ForwardKernel::Direct,
        ForwardKernel::Grouped(2),
        ForwardKernel::Grouped(4),
        ForwardKernel::Staged(1),
        ForwardKernel::Staged(2),
        ForwardKernel::Wide,
    ];
}

/// [`expert_linear_forward`] by `kernel`.
#[allow(clippy::too_many_arguments)]
pub fn expert_linear_forward_by<E: Executor>(
    e: &E,
    kernel: ForwardKernel,
    x: &E::Buffer,
    routes: usize,
    rows_per_route: usize,
    w: &ExpertWeights<E::Buffer>,
    coeff: Option<&E::Buffer>,
    act: Option<Activation>,
    pre: Option<&E::Buffer>,
    y: &E::Buffer,
) -> Result<()> {
    // The kernel, the routes each block takes (`None`: one, and no route count among its arguments) and the
    // width of its tiles (64 rows each).
    let (name, routes_per_block, width) = match kernel {
        ForwardKernel::Direct => ("expert_linear_forward", None, TILE),
        ForwardKernel::Grouped(2) => ("expert_linear_forward_x2", Some(2), TILE),
        ForwardKernel::Grouped(4) => ("expert_linear_forward_x4", Some(4), TILE),
        ForwardKernel::Staged(1) => ("expert_linear_forward_staged", Some(1), TILE),
        ForwardKernel::Staged(2) => ("expert_linear_forward_staged_x2", Some(2), TILE),
        ForwardKernel::Wide => ("expert_linear_forward_wide", None, WIDE_TILE),
        other => anyhow::bail!("{other:?}: no such kernel (grouped: 2 or 4 routes per block; staged: 1 or 2)"),
    };
    if let ForwardKernel::Grouped(_) = kernel {
        ensure!(w.experts > 0, "{name}: a layer without experts");
    }
    if !check_forward(e, name, x, routes, rows_per_route, w, coeff, y)? {
        return Ok(());
    }
    if let Some(p) = pre {
        need(e, p, routes * rows_per_route * w.out_features, &format!("{name} pre"))?;
    }
    let dims = Dims {
        grid: (
            routes.div_ceil(routes_per_block.unwrap_or(1)) as u32,
            rows_per_route.div_ceil(TILE) as u32,
            w.out_features.div_ceil(width) as u32,
        ),
        block: (256, 1, 1),
    };
    // x, the weights, pre, y, the route count (kernels taking several routes per block), the shape.
    let mut args = vec![Arg::Buf(x)];
    args.extend(weight_args(w, coeff));
    args.extend([opt(pre), Arg::Buf(y)]);
    if routes_per_block.is_some() {
        args.push(Arg::I32(int(routes, "routes")?));
    }
    args.extend(shape_args(rows_per_route, w, act)?);
    e.launch(name, dims, &args)
}

/// The kernels that compute [`expert_linear_backward_input`] per route: the same products, interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InputGradientKernel {
    /// kernels/expert_linear.cu: sources loaded as they merge (the kernel measured on a card).
    #[default]
    Direct,
    /// kernels/expert_linear_staged.cu: sources staged by `cp.async` several tiles ahead (sm_80 and later).
    Staged,
    /// kernels/expert_linear_wide.cu: 64 × 128 tiles, float4 operand reads, sources staged (sm_80 and later).
    Wide,
}

impl InputGradientKernel {
    /// Every candidate for a per-sample (several routes) input gradient with experts.
    pub const CANDIDATES: [InputGradientKernel; 3] =
        [InputGradientKernel::Direct, InputGradientKernel::Staged, InputGradientKernel::Wide];
}

/// `dx_r = dy_r · W_r` per route, by `kernel`.
#[allow(clippy::too_many_arguments)]
pub fn expert_linear_backward_input<E: Executor>(
    e: &E,
    kernel: InputGradientKernel,
    dy: &E::Buffer,
    routes: usize,
    rows_per_route: usize,
    w: &ExpertWeights<E::Buffer>,
    coeff: Option<&E::Buffer>,
    dx: &E::Buffer,
) -> Result<()> {
    w.check(e)?;
    let rows = routes * rows_per_route;
    need(e, dy, rows * w.out_features, "expert_linear_backward_input dy")?;
    need(e, dx, rows * w.in_features, "expert_linear_backward_input dx")?;
    if w.experts > 0 {
        need(
            e,
            coeff.ok_or_else(|| anyhow::anyhow!("expert_linear_backward_input: no coefficients"))?,
            routes * w.experts,
            "coefficients",
        )?;
    }
    if rows == 0 {
        return Ok(());
    }
    let width = if kernel == InputGradientKernel::Wide { WIDE_TILE } else { TILE };
    let dims = Dims {
        grid: (routes as u32, rows_per_route.div_ceil(TILE) as u32, w.in_features.div_ceil(width) as u32),
        block: (256, 1, 1),
    };
    let mut args = vec![
        Arg::Buf(dy),
        Arg::Buf(w.base),
        opt(if w.experts > 0 { w.tasks } else { None }),
        opt(if w.experts > 0 { coeff } else { None }),
        Arg::Buf(dx),
    ];
    if kernel == InputGradientKernel::Staged {
        args.push(Arg::I32(int(routes, "routes")?));
    }
    args.extend([
        Arg::I32(int(rows_per_route, "rows per route")?),
        Arg::I32(int(w.in_features, "in features")?),
        Arg::I32(int(w.out_features, "out features")?),
        Arg::I32(w.experts as i32),
    ]);
    let name = match kernel {
        InputGradientKernel::Direct => "expert_linear_backward_input",
        InputGradientKernel::Staged => "expert_linear_backward_input_staged",
        InputGradientKernel::Wide => "expert_linear_backward_input_wide",
    };
    e.launch(name, dims, &args)
}

/// The router gradient `dc[r, t] = <τ_t, dy_rᵀ·x_r> + <β_t, Σ dy_r>` into `dc` `[routes, T]`.
pub fn expert_linear_backward_coeff<E: Executor>(
    e: &E,
    x: &E::Buffer,
    dy: &E::Buffer,
    routes: usize,
    rows_per_route: usize,
    w: &ExpertWeights<E::Buffer>,
    dc: &E::Buffer,
) -> Result<()> {
    w.check(e)?;
    ensure!(w.experts > 0, "expert_linear_backward_coeff: a layer without experts has no router gradient");
    let rows = routes * rows_per_route;
    need(e, x, rows * w.in_features, "expert_linear_backward_coeff x")?;
    need(e, dy, rows * w.out_features, "expert_linear_backward_coeff dy")?;
    need(e, dc, routes * w.experts, "expert_linear_backward_coeff dc")?;
    let (ot, it) = (w.out_features.div_ceil(TILE), w.in_features.div_ceil(TILE));
    let partial = e.zeros(routes * ot * it * w.experts)?;
    e.launch(
        "expert_linear_backward_coeff",
        Dims { grid: (routes as u32, ot as u32, it as u32), block: (256, 1, 1) },
        &[
            Arg::Buf(x),
            Arg::Buf(dy),
            opt(w.tasks),
            opt(if w.base_bias.is_some() { w.task_biases } else { None }),
            Arg::Buf(&partial),
            Arg::I32(int(rows_per_route, "rows per route")?),
            Arg::I32(int(w.in_features, "in features")?),
            Arg::I32(int(w.out_features, "out features")?),
            Arg::I32(w.experts as i32),
        ],
    )?;
    let outputs = routes * w.experts;
    e.launch(
        "reduce_tiles",
        Dims::elementwise(outputs, 128, u32::MAX),
        &[
            Arg::Buf(&partial),
            Arg::Buf(dc),
            Arg::I32(int(routes, "routes")?),
            Arg::I32(int(ot * it, "tiles")?),
            Arg::I32(w.experts as i32),
        ],
    )
}

/// `dW = dyᵀ·x` `[out, in]` and `db = Σ_rows dy` over `rows` rows (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_weight<E: Executor>(
    e: &E,
    x: &E::Buffer,
    dy: &E::Buffer,
    rows: usize,
    in_features: usize,
    out_features: usize,
    dw: &E::Buffer,
    db: Option<&E::Buffer>,
) -> Result<()> {
    need(e, x, rows * in_features, "linear_backward_weight x")?;
    need(e, dy, rows * out_features, "linear_backward_weight dy")?;
    need(e, dw, out_features * in_features, "linear_backward_weight dW")?;
    if let Some(db) = db {
        need(e, db, out_features, "linear_backward_weight db")?;
    }
    e.launch(
        "linear_backward_weight",
        Dims { grid: (1, out_features.div_ceil(TILE) as u32, in_features.div_ceil(TILE) as u32), block: (256, 1, 1) },
        &[
            Arg::Buf(x),
            Arg::Buf(dy),
            Arg::Buf(dw),
            opt(db),
            Arg::I32(int(rows, "rows")?),
            Arg::I32(int(in_features, "in features")?),
            Arg::I32(int(out_features, "out features")?),
        ],
    )
}

/// `out = W0 + Σ_t coeff[t]·τ_t` for one route (`size` values per weight): the materialised merge.
pub fn merge_experts<E: Executor>(
    e: &E,
    base: &E::Buffer,
    tasks: &E::Buffer,
    coeff: &E::Buffer,
    size: usize,
    experts: usize,
    out: &E::Buffer,
) -> Result<()> {
    need(e, base, size, "merge_experts W0")?;
    need(e, tasks, experts * size, "merge_experts τ")?;
    need(e, coeff, experts, "merge_experts coefficients")?;
    need(e, out, size, "merge_experts out")?;
    e.launch(
        "merge_experts",
        Dims::elementwise(size, 256, 4096),
        &[
            Arg::Buf(base),
            Arg::Buf(tasks),
            Arg::Buf(coeff),
            Arg::Buf(out),
            Arg::I32(int(size, "size")?),
            Arg::I32(experts as i32),
        ],
    )
}

/// The router head: `w[b] = mean_n act(h[b,n]·W2ᵀ + b2)` with `act` softmax over experts or identity;
/// `logits` (if given) receives the per-token outputs before the activation.
#[allow(clippy::too_many_arguments)]
pub fn router_head_forward<E: Executor>(
    e: &E,
    h: &E::Buffer,
    w2: &E::Buffer,
    b2: &E::Buffer,
    batch: usize,
    tokens: usize,
    hidden: usize,
    experts: usize,
    softmax: bool,
    logits: Option<&E::Buffer>,
    w: &E::Buffer,
) -> Result<()> {
    ensure!((1..=32).contains(&experts), "router head: {experts} experts, the kernel takes 1 to 32");
    need(e, h, batch * tokens * hidden, "router_head_forward h")?;
    need(e, w2, experts * hidden, "router_head_forward W2")?;
    need(e, b2, experts, "router_head_forward b2")?;
    need(e, w, batch * experts, "router_head_forward w")?;
    if let Some(l) = logits {
        need(e, l, batch * tokens * experts, "router_head_forward logits")?;
    }
    e.launch(
        "router_head_forward",
        Dims { grid: (batch as u32, 1, 1), block: (256, 1, 1) },
        &[
            Arg::Buf(h),
            Arg::Buf(w2),
            Arg::Buf(b2),
            opt(logits),
            Arg::Buf(w),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(hidden, "hidden")?),
            Arg::I32(experts as i32),
            Arg::I32(softmax as i32),
        ],
    )
}

/// Backward of [`router_head_forward`] from `dw` `[B, T]`: `dlogits` `[B·N, T]` and `dh = dlogits·W2`.
#[allow(clippy::too_many_arguments)]
pub fn router_head_backward<E: Executor>(
    e: &E,
    logits: &E::Buffer,
    w2: &E::Buffer,
    dw: &E::Buffer,
    batch: usize,
    tokens: usize,
    hidden: usize,
    experts: usize,
    softmax: bool,
    dlogits: &E::Buffer,
    dh: &E::Buffer,
) -> Result<()> {
    ensure!((1..=32).contains(&experts), "router head: {experts} experts, the kernel takes 1 to 32");
    need(e, logits, batch * tokens * experts, "router_head_backward logits")?;
    need(e, w2, experts * hidden, "router_head_backward W2")?;
    need(e, dw, batch * experts, "router_head_backward dw")?;
    need(e, dlogits, batch * tokens * experts, "router_head_backward dlogits")?;
    need(e, dh, batch * tokens * hidden, "router_head_backward dh")?;
    e.launch(
        "router_head_backward",
        Dims { grid: (batch as u32, 1, 1), block: (256, 1, 1) },
        &[
            Arg::Buf(logits),
            Arg::Buf(w2),
            Arg::Buf(dw),
            Arg::Buf(dlogits),
            Arg::Buf(dh),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(hidden, "hidden")?),
            Arg::I32(experts as i32),
            Arg::I32(softmax as i32),
        ],
    )
}

/// Batch routing: means of `w` `[batch, T]` over consecutive groups of `group` samples.
pub fn group_mean<E: Executor>(
    e: &E,
    w: &E::Buffer,
    batch: usize,
    group: usize,
    experts: usize,
    out: &E::Buffer,
) -> Result<()> {
    ensure!(group > 0, "group_mean: empty groups");
    let groups = batch.div_ceil(group);
    need(e, w, batch * experts, "group_mean w")?;
    need(e, out, groups * experts, "group_mean out")?;
    e.launch(
        "group_mean",
        Dims::elementwise(groups * experts, 128, u32::MAX),
        &[
            Arg::Buf(w),
            Arg::Buf(out),
            Arg::I32(int(batch, "batch")?),
            Arg::I32(int(group, "group")?),
            Arg::I32(int(experts, "experts")?),
        ],
    )
}

/// LayerNorm of `rows` rows of `width`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward<E: Executor>(
    e: &E,
    x: &E::Buffer,
    weight: &E::Buffer,
    bias: &E::Buffer,
    rows: usize,
    width: usize,
    eps: f32,
    y: &E::Buffer,
) -> Result<()> {
    need(e, x, rows * width, "layer_norm x")?;
    need(e, y, rows * width, "layer_norm y")?;
    need(e, weight, width, "layer_norm weight")?;
    need(e, bias, width, "layer_norm bias")?;
    e.launch(
        "layer_norm_forward",
        Dims { grid: (rows as u32, 1, 1), block: (256, 1, 1) },
        &[Arg::Buf(x), Arg::Buf(weight), Arg::Buf(bias), Arg::Buf(y), Arg::I32(int(width, "width")?), Arg::F32(eps)],
    )
}

/// The input gradient of LayerNorm with frozen affine parameters.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<E: Executor>(
    e: &E,
    x: &E::Buffer,
    weight: &E::Buffer,
    dy: &E::Buffer,
    rows: usize,
    width: usize,
    eps: f32,
    dx: &E::Buffer,
) -> Result<()> {
    need(e, x, rows * width, "layer_norm_backward x")?;
    need(e, dy, rows * width, "layer_norm_backward dy")?;
    need(e, dx, rows * width, "layer_norm_backward dx")?;
    need(e, weight, width, "layer_norm_backward weight")?;
    e.launch(
        "layer_norm_backward",
        Dims { grid: (rows as u32, 1, 1), block: (256, 1, 1) },
        &[Arg::Buf(x), Arg::Buf(weight), Arg::Buf(dy), Arg::Buf(dx), Arg::I32(int(width, "width")?), Arg::F32(eps)],
    )
}

/// LayerNorm's affine parameters' gradients over `rows` rows of `width`: `dw = Σ dy∘x̂` and `db = Σ dy`, each
/// `[width]`, summed in f64.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_param_grads<E: Executor>(
    e: &E,
    x: &E::Buffer,
    dy: &E::Buffer,
    rows: usize,
    width: usize,
    eps: f32,
    dw: &E::Buffer,
    db: &E::Buffer,
) -> Result<()> {
    need(e, x, rows * width, "layer_norm_param_grads x")?;
    need(e, dy, rows * width, "layer_norm_param_grads dy")?;
    need(e, dw, width, "layer_norm_param_grads dweight")?;
    need(e, db, width, "layer_norm_param_grads dbias")?;
    let chunks = rows.div_ceil(LN_CHUNK);
    let (partial_w, partial_b) = (e.zeros(2 * chunks * width)?, e.zeros(2 * chunks * width)?);
    if chunks > 0 {
        let stats = e.zeros(rows * 3)?;
        e.launch(
            "layer_norm_statistics",
            Dims { grid: (int(rows, "rows")? as u32, 1, 1), block: (256, 1, 1) },
            &[Arg::Buf(x), Arg::Buf(&stats), Arg::I32(int(width, "width")?), Arg::F32(eps)],
        )?;
        e.launch(
            "layer_norm_param_grads",
            Dims { grid: (width.div_ceil(32) as u32, chunks as u32, 1), block: (32, 8, 1) },
            &[
                Arg::Buf(x),
                Arg::Buf(dy),
                Arg::Buf(&stats),
                Arg::Buf(&partial_w),
                Arg::Buf(&partial_b),
                Arg::I32(int(rows, "rows")?),
                Arg::I32(int(width, "width")?),
            ],
        )?;
    }
    column_sums(e, &partial_w, 2 * chunks, width, dw)?;
    column_sums(e, &partial_b, 2 * chunks, width, db)
}

/// `out[c] = Σ_r x[r, c]` over `rows` rows of `width`, summed in f64 in row order.
pub fn column_sums<E: Executor>(e: &E, x: &E::Buffer, rows: usize, width: usize, out: &E::Buffer) -> Result<()> {
    need(e, x, rows * width, "column_sums x")?;
    need(e, out, width, "column_sums out")?;
    e.launch(
        "column_sums",
        Dims::elementwise(width, 128, 4096),
        &[Arg::Buf(x), Arg::Buf(out), Arg::I32(int(rows, "rows")?), Arg::I32(int(width, "width")?)],
    )
}

/// `out = base + Σ_t lambdas[t]·tasks[t]` over `n` values (`tasks` `[T, n]`), each product rounded before it
/// is added, the experts in order: the CPU's bits.
pub fn merge_rounded<E: Executor>(
    e: &E,
    base: &E::Buffer,
    tasks: &E::Buffer,
    lambdas: &E::Buffer,
    n: usize,
    experts: usize,
    out: &E::Buffer,
) -> Result<()> {
    need(e, base, n, "merge_rounded base")?;
    need(e, tasks, experts * n, "merge_rounded task vectors")?;
    need(e, lambdas, experts, "merge_rounded coefficients")?;
    need(e, out, n, "merge_rounded out")?;
    e.launch(
        "merge_rounded",
        Dims::elementwise(n, 256, 8192),
        &[
            Arg::Buf(base),
            Arg::Buf(tasks),
            Arg::Buf(lambdas),
            Arg::Buf(out),
            Arg::I32(int(n, "n")?),
            Arg::I32(int(experts, "experts")?),
        ],
    )
}

/// `out[t] = Σ_i tasks[t, i]·g[i]` for each of `experts` task vectors of `n` values, summed in f64.
pub fn task_vector_dots<E: Executor>(
    e: &E,
    tasks: &E::Buffer,
    g: &E::Buffer,
    n: usize,
    experts: usize,
    out: &E::Buffer,
) -> Result<()> {
    need(e, tasks, experts * n, "task_vector_dots task vectors")?;
    need(e, g, n, "task_vector_dots gradient")?;
    need(e, out, experts, "task_vector_dots out")?;
    let chunks = n.div_ceil(DOT_CHUNK);
    let partial = e.zeros(2 * chunks * experts)?;
    if chunks > 0 && experts > 0 {
        e.launch(
            "task_vector_dots",
            Dims { grid: (chunks as u32, int(experts, "experts")? as u32, 1), block: (256, 1, 1) },
            &[Arg::Buf(tasks), Arg::Buf(g), Arg::Buf(&partial), Arg::I32(int(n, "n")?)],
        )?;
    }
    column_sums(e, &partial, 2 * chunks, experts, out)
}

/// `y = act(z)` over `n` values.
pub fn activation_forward<E: Executor>(e: &E, z: &E::Buffer, n: usize, act: Activation, y: &E::Buffer) -> Result<()> {
    need(e, z, n, "activation z")?;
    need(e, y, n, "activation y")?;
    e.launch(
        "activation_forward",
        Dims::elementwise(n, 256, 8192),
        &[Arg::Buf(z), Arg::Buf(y), Arg::I32(int(n, "n")?), Arg::I32(act_code(Some(act)))],
    )
}

/// `dz = dy ∘ act'(z)` over `n` values.
pub fn activation_backward<E: Executor>(
    e: &E,
    z: &E::Buffer,
    dy: &E::Buffer,
    n: usize,
    act: Activation,
    dz: &E::Buffer,
) -> Result<()> {
    need(e, z, n, "activation_backward z")?;
    need(e, dy, n, "activation_backward dy")?;
    need(e, dz, n, "activation_backward dz")?;
    e.launch(
        "activation_backward",
        Dims::elementwise(n, 256, 8192),
        &[Arg::Buf(z), Arg::Buf(dy), Arg::Buf(dz), Arg::I32(int(n, "n")?), Arg::I32(act_code(Some(act)))],
    )
}

/// `y = act(y + b)` in place over `rows` rows of `width` (`b` `[width]` optional): the bias and activation of
/// a dense product computed without them.
pub fn bias_activation<E: Executor>(
    e: &E,
    y: &E::Buffer,
    b: Option<&E::Buffer>,
    rows: usize,
    width: usize,
    act: Option<Activation>,
) -> Result<()> {
    let n = rows * width;
    need(e, y, n, "bias_activation y")?;
    if let Some(b) = b {
        need(e, b, width, "bias_activation b")?;
    }
    if n == 0 || (b.is_none() && act.is_none()) {
        return Ok(());
    }
    e.launch(
        "bias_activation",
        Dims::elementwise(n, 256, 8192),
        &[Arg::Buf(y), opt(b), Arg::I32(int(rows, "rows")?), Arg::I32(int(width, "width")?), Arg::I32(act_code(act))],
    )
}

/// `y += x` over `n` values.
pub fn add_in_place<E: Executor>(e: &E, y: &E::Buffer, x: &E::Buffer, n: usize) -> Result<()> {
    need(e, y, n, "add_in_place y")?;
    need(e, x, n, "add_in_place x")?;
    e.launch("add_in_place", Dims::elementwise(n, 256, 8192), &[Arg::Buf(y), Arg::Buf(x), Arg::I32(int(n, "n")?)])
}

/// Each row's softmax entropy into `entropy` `[rows]`, and the gradient of their mean into `dlogits`.
pub fn softmax_entropy<E: Executor>(
    e: &E,
    logits: &E::Buffer,
    rows: usize,
    classes: usize,
    entropy: &E::Buffer,
    dlogits: &E::Buffer,
) -> Result<()> {
    need(e, logits, rows * classes, "softmax_entropy logits")?;
    need(e, entropy, rows, "softmax_entropy entropy")?;
    need(e, dlogits, rows * classes, "softmax_entropy dlogits")?;
    e.launch(
        "softmax_entropy",
        Dims { grid: (rows.div_ceil(8).max(1) as u32, 1, 1), block: (256, 1, 1) },
        &[
            Arg::Buf(logits),
            Arg::Buf(entropy),
            Arg::Buf(dlogits),
            Arg::I32(int(rows, "rows")?),
            Arg::I32(int(classes, "classes")?),
        ],
    )
}

/// One Adam step (torch's arithmetic) over `n` parameters at step `step` (1-based).
#[allow(clippy::too_many_arguments)]
pub fn adam_step<E: Executor>(
    e: &E,
    params: &E::Buffer,
    grads: &E::Buffer,
    m: &E::Buffer,
    v: &E::Buffer,
    n: usize,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    step: u64,
) -> Result<()> {
    ensure!(step >= 1, "adam_step: steps count from 1");
    for (b, what) in [(params, "parameters"), (grads, "gradients"), (m, "first moments"), (v, "second moments")] {
        need(e, b, n, what)?;
    }
    let t = step as i32;
    let step_size = lr / (1.0 - betas.0.powi(t));
    let correction2 = (1.0 - betas.1.powi(t)).sqrt();
    e.launch(
        "adam_step",
        Dims::elementwise(n, 256, 4096),
        &[
            Arg::Buf(params),
            Arg::Buf(grads),
            Arg::Buf(m),
            Arg::Buf(v),
            Arg::I32(int(n, "n")?),
            Arg::F64(betas.0),
            Arg::F64(betas.1),
            Arg::F64(step_size),
            Arg::F64(correction2),
            Arg::F64(eps),
        ],
    )
}

/// The most tokens the attention kernels take (their per-warp score rows live in shared memory).
pub const ATTENTION_MAX_TOKENS: usize = 1024;

fn attention_dims(batch: usize, tokens: usize, heads: usize) -> Dims {
    Dims { grid: (tokens.div_ceil(8) as u32, heads as u32, batch as u32), block: (256, 1, 1) }
}

fn check_attention<E: Executor>(
    e: &E,
    bufs: &[&E::Buffer],
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
) -> Result<()> {
    ensure!(heads > 0 && width.is_multiple_of(heads), "attention: width {width} does not split into {heads} heads");
    ensure!(
        tokens <= ATTENTION_MAX_TOKENS,
        "attention: {tokens} tokens, the kernels take at most {ATTENTION_MAX_TOKENS}"
    );
    for b in bufs {
        need(e, b, batch * tokens * width, "attention [B, N, D]")?;
    }
    Ok(())
}

/// Multi-head attention of `q`, `k`, `v` `[B, N, D]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<E: Executor>(
    e: &E,
    q: &E::Buffer,
    k: &E::Buffer,
    v: &E::Buffer,
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
    out: &E::Buffer,
) -> Result<()> {
    check_attention(e, &[q, k, v, out], batch, tokens, width, heads)?;
    e.launch(
        "attention_forward",
        attention_dims(batch, tokens, heads),
        &[
            Arg::Buf(q),
            Arg::Buf(k),
            Arg::Buf(v),
            Arg::Buf(out),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(width, "width")?),
            Arg::I32(heads as i32),
        ],
    )
}

/// Backward of [`attention_forward`]: `dq`, `dk`, `dv` from `d_out`, with scratch for the probabilities and
/// the score gradients (`[B, heads, N, N]` each, allocated here).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<E: Executor>(
    e: &E,
    q: &E::Buffer,
    k: &E::Buffer,
    v: &E::Buffer,
    d_out: &E::Buffer,
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
    grads: (&E::Buffer, &E::Buffer, &E::Buffer),
) -> Result<()> {
    let (dq, dk, dv) = grads;
    check_attention(e, &[q, k, v, d_out, dq, dk, dv], batch, tokens, width, heads)?;
    let scratch = batch * heads * tokens * tokens;
    let (p, ds) = (e.zeros(scratch)?, e.zeros(scratch)?);
    let dims = attention_dims(batch, tokens, heads);
    let (n, w, h) = (Arg::I32(int(tokens, "tokens")?), Arg::I32(int(width, "width")?), Arg::I32(heads as i32));
    e.launch(
        "attention_backward_rows",
        dims,
        &[Arg::Buf(q), Arg::Buf(k), Arg::Buf(v), Arg::Buf(d_out), Arg::Buf(&p), Arg::Buf(&ds), Arg::Buf(dq), n, w, h],
    )?;
    let (n, w, h) = (Arg::I32(tokens as i32), Arg::I32(width as i32), Arg::I32(heads as i32));
    e.launch(
        "attention_backward_columns",
        dims,
        &[Arg::Buf(q), Arg::Buf(d_out), Arg::Buf(&p), Arg::Buf(&ds), Arg::Buf(dk), Arg::Buf(dv), n, w, h],
    )
}

/// The patches of `pixels` `[B, C, S, S]` as rows `[B·(S/P)², C·P·P]` in the convolution weight's order;
/// `geometry` is (B, C, S, P).
pub fn patch_rows<E: Executor>(e: &E, pixels: &E::Buffer, geometry: (usize, usize, usize, usize)) -> Result<E::Buffer> {
    let (batch, channels, image, patch) = geometry;
    ensure!(patch > 0 && image.is_multiple_of(patch), "patch_rows: image {image} is not a multiple of patch {patch}");
    let len = batch * (image / patch) * (image / patch) * channels * patch * patch;
    need(e, pixels, batch * channels * image * image, "patch_rows pixels")?;
    let rows = e.zeros(len)?;
    e.launch(
        "patch_rows",
        Dims::elementwise(len, 256, 8192),
        &[
            Arg::Buf(pixels),
            Arg::Buf(&rows),
            Arg::I32(int(batch, "batch")?),
            Arg::I32(int(channels, "channels")?),
            Arg::I32(int(image, "image")?),
            Arg::I32(int(patch, "patch")?),
        ],
    )?;
    Ok(rows)
}

/// The patch tokens' rows of `x` `[B, N, D]` (all but the class token) into `out` `[B·(N−1), D]`.
pub fn patch_token_rows<E: Executor>(
    e: &E,
    x: &E::Buffer,
    batch: usize,
    tokens: usize,
    width: usize,
    out: &E::Buffer,
) -> Result<()> {
    ensure!(tokens > 0, "patch_token_rows: no tokens");
    need(e, x, batch * tokens * width, "patch_token_rows x")?;
    need(e, out, batch * (tokens - 1) * width, "patch_token_rows out")?;
    e.launch(
        "patch_token_rows",
        Dims::elementwise(batch * (tokens - 1) * width, 256, 8192),
        &[
            Arg::Buf(x),
            Arg::Buf(out),
            Arg::I32(int(batch, "batch")?),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(width, "width")?),
        ],
    )
}

/// CLIP's embeddings: patches of `pixels` `[B, C, S, S]` times `weight` `[D, C·P·P]`, the class token first,
/// the position embedding `[N, D]` added; into `out` `[B, N, D]`.
#[allow(clippy::too_many_arguments)]
pub fn patch_embed<E: Executor>(
    e: &E,
    pixels: &E::Buffer,
    weight: &E::Buffer,
    class_embedding: &E::Buffer,
    position: &E::Buffer,
    geometry: (usize, usize, usize, usize, usize),
    out: &E::Buffer,
) -> Result<()> {
    let (batch, channels, image, patch, width) = geometry;
    ensure!(patch > 0 && image.is_multiple_of(patch), "patch_embed: image {image} is not a multiple of patch {patch}");
    let grid = image / patch;
    let (patches, patch_len, tokens) = (grid * grid, channels * patch * patch, grid * grid + 1);
    need(e, pixels, batch * channels * image * image, "patch_embed pixels")?;
    need(e, class_embedding, width, "patch_embed class embedding")?;
    need(e, position, tokens * width, "patch_embed position embedding")?;
    need(e, out, batch * tokens * width, "patch_embed out")?;
    let rows = patch_rows(e, pixels, (batch, channels, image, patch))?;
    let embedded = e.zeros(batch * patches * width)?;
    let w = ExpertWeights {
        base: weight,
        base_bias: None,
        tasks: None,
        task_biases: None,
        out_features: width,
        in_features: patch_len,
        experts: 0,
    };
    expert_linear_forward(e, &rows, 1, batch * patches, &w, None, None, None, &embedded)?;
    e.launch(
        "assemble_tokens",
        Dims::elementwise(batch * tokens * width, 256, 8192),
        &[
            Arg::Buf(&embedded),
            Arg::Buf(class_embedding),
            Arg::Buf(position),
            Arg::Buf(out),
            Arg::I32(int(batch, "batch")?),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(width, "width")?),
        ],
    )
}

/// The patch embedding's parameter gradients from the tokens' gradient `d_tokens` `[B, N, D]`: `dw`
/// `[D, C·P·P]` = (the patch tokens' gradient)ᵀ · (the patches as rows), `d_class` `[D]` and `d_position`
/// `[N, D]` the gradient summed over samples (in f64); `geometry` is (B, C, S, P, D).
#[allow(clippy::too_many_arguments)]
pub fn patch_embed_backward<E: Executor>(
    e: &E,
    pixels: &E::Buffer,
    d_tokens: &E::Buffer,
    geometry: (usize, usize, usize, usize, usize),
    dw: &E::Buffer,
    d_class: &E::Buffer,
    d_position: &E::Buffer,
) -> Result<()> {
    let (batch, channels, image, patch, width) = geometry;
    let rows = patch_rows(e, pixels, (batch, channels, image, patch))?;
    let (patches, patch_len) = ((image / patch) * (image / patch), channels * patch * patch);
    let tokens = patches + 1;
    need(e, d_tokens, batch * tokens * width, "patch_embed_backward d_tokens")?;
    need(e, d_class, width, "patch_embed_backward d_class")?;
    let d_patches = e.zeros(batch * patches * width)?;
    patch_token_rows(e, d_tokens, batch, tokens, width, &d_patches)?;
    linear_backward_weight(e, &rows, &d_patches, batch * patches, patch_len, width, dw, None)?;
    column_sums(e, d_tokens, batch, tokens * width, d_position)?;
    copy(e, d_position, width, d_class)
}

/// Token `index` of `x` `[B, N, D]` into `out` `[B, D]`, or (backward) `dy` `[B, D]` scattered into zeros.
#[allow(clippy::too_many_arguments)]
pub fn select_token<E: Executor>(
    e: &E,
    x: &E::Buffer,
    batch: usize,
    tokens: usize,
    width: usize,
    index: usize,
    backward: bool,
    out: &E::Buffer,
) -> Result<()> {
    ensure!(index < tokens, "select_token: token {index} of {tokens}");
    let (small, large) = if backward { (x, out) } else { (out, x) };
    need(e, small, batch * width, "select_token [B, D]")?;
    need(e, large, batch * tokens * width, "select_token [B, N, D]")?;
    let n = if backward { batch * tokens * width } else { batch * width };
    e.launch(
        if backward { "select_token_backward" } else { "select_token" },
        Dims::elementwise(n, 256, 8192),
        &[
            Arg::Buf(x),
            Arg::Buf(out),
            Arg::I32(int(batch, "batch")?),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(width, "width")?),
            Arg::I32(int(index, "index")?),
        ],
    )
}

/// `y = x·factor` over `n` values.
pub fn scale<E: Executor>(e: &E, x: &E::Buffer, n: usize, factor: f32, y: &E::Buffer) -> Result<()> {
    need(e, x, n, "scale x")?;
    need(e, y, n, "scale y")?;
    e.launch(
        "scale_values",
        Dims::elementwise(n, 256, 8192),
        &[Arg::Buf(x), Arg::Buf(y), Arg::I32(int(n, "n")?), Arg::F32(factor)],
    )
}

/// `y = x` over `n` values.
pub fn copy<E: Executor>(e: &E, x: &E::Buffer, n: usize, y: &E::Buffer) -> Result<()> {
    need(e, x, n, "copy x")?;
    need(e, y, n, "copy y")?;
    e.launch("copy_values", Dims::elementwise(n, 256, 8192), &[Arg::Buf(x), Arg::Buf(y), Arg::I32(int(n, "n")?)])
}

/// The mean over the rows of `x` `[rows, width]` into `out` `[width]`.
pub fn mean_rows<E: Executor>(e: &E, x: &E::Buffer, rows: usize, width: usize, out: &E::Buffer) -> Result<()> {
    need(e, x, rows * width, "mean_rows x")?;
    need(e, out, width, "mean_rows out")?;
    e.launch(
        "mean_rows",
        Dims::elementwise(width, 128, 4096),
        &[Arg::Buf(x), Arg::Buf(out), Arg::I32(int(rows, "rows")?), Arg::I32(int(width, "width")?)],
    )
}

/// Rows of `x` divided by their L2 norms into `y`; or, with `dy`, the backward into `y`.
pub fn l2_normalize<E: Executor>(
    e: &E,
    x: &E::Buffer,
    dy: Option<&E::Buffer>,
    rows: usize,
    width: usize,
    y: &E::Buffer,
) -> Result<()> {
    need(e, x, rows * width, "l2_normalize x")?;
    need(e, y, rows * width, "l2_normalize out")?;
    let dims = Dims { grid: (rows.div_ceil(8).max(1) as u32, 1, 1), block: (256, 1, 1) };
    let (r, w) = (Arg::I32(int(rows, "rows")?), Arg::I32(int(width, "width")?));
    match dy {
        None => e.launch("l2_normalize", dims, &[Arg::Buf(x), Arg::Buf(y), r, w]),
        Some(dy) => {
            need(e, dy, rows * width, "l2_normalize_backward dy")?;
            e.launch("l2_normalize_backward", dims, &[Arg::Buf(x), Arg::Buf(dy), Arg::Buf(y), r, w])
        }
    }
}

/// The router's reduction of per-token outputs `[B, N, T]` into `w` `[B, T]`.
pub fn router_reduce<E: Executor>(
    e: &E,
    logits: &E::Buffer,
    batch: usize,
    tokens: usize,
    experts: usize,
    softmax: bool,
    w: &E::Buffer,
) -> Result<()> {
    ensure!((1..=32).contains(&experts), "router_reduce: {experts} experts, the kernel takes 1 to 32");
    need(e, logits, batch * tokens * experts, "router_reduce logits")?;
    need(e, w, batch * experts, "router_reduce w")?;
    e.launch(
        "router_reduce",
        Dims { grid: (batch as u32, 1, 1), block: (256, 1, 1) },
        &[
            Arg::Buf(logits),
            Arg::Buf(w),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(experts as i32),
            Arg::I32(softmax as i32),
        ],
    )
}

/// Backward of [`router_reduce`]: `dlogits` `[B, N, T]` from `dw` `[B, T]`.
#[allow(clippy::too_many_arguments)]
pub fn router_reduce_backward<E: Executor>(
    e: &E,
    logits: &E::Buffer,
    dw: &E::Buffer,
    batch: usize,
    tokens: usize,
    experts: usize,
    softmax: bool,
    dlogits: &E::Buffer,
) -> Result<()> {
    ensure!((1..=32).contains(&experts), "router_reduce_backward: {experts} experts, the kernel takes 1 to 32");
    need(e, logits, batch * tokens * experts, "router_reduce_backward logits")?;
    need(e, dw, batch * experts, "router_reduce_backward dw")?;
    need(e, dlogits, batch * tokens * experts, "router_reduce_backward dlogits")?;
    e.launch(
        "router_reduce_backward",
        Dims { grid: (batch as u32, 1, 1), block: (256, 1, 1) },
        &[
            Arg::Buf(logits),
            Arg::Buf(dw),
            Arg::Buf(dlogits),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(experts as i32),
            Arg::I32(softmax as i32),
        ],
    )
}
