//! One launch wrapper per kernel: shapes checked against the buffers, grid and block chosen, arguments in
//! the kernel's order. Generic over the [`Executor`], so the code that the GPU runs is the code that the
//! host emulation proves in `cargo test`. One file per kernel family of `kernels/`, named after its source
//! (`expert_linear.rs` for every `expert_linear*.cu`).

use anyhow::{ensure, Result};

use super::launch::{Arg, Executor};
use crate::device::Activation;

mod adam;
mod attention;
mod elementwise;
mod entropy;
mod expert_linear;
mod layer_norm;
mod router;
mod task_vectors;
mod tokens;

pub use adam::*;
pub use attention::*;
pub use elementwise::*;
pub use entropy::*;
pub use expert_linear::*;
pub use layer_norm::*;
pub use router::*;
pub use task_vectors::*;
pub use tokens::*;

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
