//! Launches of the token and row kernels (`tokens.cu`): the patch embedding, token selection, row means and
//! sums, scaling and copies, L2 normalisation, and the router's token mean.

use anyhow::{ensure, Result};

use super::{expert_linear_forward, linear_backward_weight, need, ExpertWeights};
use crate::cuda::launch::{int, Arg, Dims, Executor};

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
