//! Launches of the router's kernels (`router.cu`): its fused last layer and token mean, forward and backward,
//! and the mean over groups of rows.

use anyhow::{ensure, Result};

use super::{need, opt};
use crate::cuda::launch::{int, Arg, Dims, Executor};

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
