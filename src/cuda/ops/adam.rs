//! The launch of Adam's kernel (`adam.cu`): one step over a parameter and its moments.

use anyhow::{ensure, Result};

use super::need;
use crate::cuda::launch::{int, Arg, Dims, Executor};

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
