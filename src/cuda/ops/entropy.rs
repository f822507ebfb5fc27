//! The launch of the adaptation loss's kernel (`entropy.cu`): softmax entropy and its gradient.

use anyhow::Result;

use super::need;
use crate::cuda::launch::{int, Arg, Dims, Executor};

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
