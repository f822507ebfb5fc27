//! Launches of the attention kernels (`attention.cu`): the forward with a fused softmax, and the backward.

use anyhow::{ensure, Result};

use super::need;
use crate::cuda::launch::{int, Arg, Dims, Executor};

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
