//! Launches of the WEMoE linear layer's kernels (`expert_linear*.cu`): the forward in its variants (loaded,
//! grouped, staged, wide, on tensor cores), the input gradient, the router gradient's contraction, the dense
//! weight gradient and the merge of a whole weight.

use anyhow::{ensure, Result};

use super::{act_code, need, opt};
use crate::cuda::launch::{int, Arg, Dims, Executor};
use crate::device::Activation;

/// Rows and columns of every tiled kernel's tiles (EL_BM, EL_BN, EG_TILE in kernels/).
const TILE: usize = 64;

/// Columns of expert_linear_wide.cu's tiles (EW_BN).
const WIDE_TILE: usize = 128;

const MAX_EXPERTS: usize = 64;

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
