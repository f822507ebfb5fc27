//! Launches of the task-vector kernels (`task_vectors.cu`), for AdaMerging on the device: the merge of a
//! model's weights with rounded products, and the contraction of gradients with the task vectors.

use anyhow::Result;

use super::{column_sums, need};
use crate::cuda::launch::{int, Arg, Dims, Executor};

/// Values of a task-vector dot's partial sums (DOT_CHUNK in kernels/task_vectors.cu).
const DOT_CHUNK: usize = 256 * 32;

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
