//! Launches of the LayerNorm kernels (`layer_norm.cu`): forward, input gradient, and the affine parameters'
//! gradients in fixed-order partial sums.

use anyhow::Result;

use super::{column_sums, need};
use crate::cuda::launch::{int, Arg, Dims, Executor};

/// Rows of a LayerNorm parameter gradient's partial sums (LN_CHUNK in kernels/layer_norm.cu).
const LN_CHUNK: usize = 256;

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
