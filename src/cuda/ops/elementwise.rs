//! Launches of the element-wise kernels (`elementwise.cu`): activations forward and backward, a bias with
//! an activation, and a residual sum.

use anyhow::Result;

use super::{act_code, need, opt};
use crate::cuda::launch::{int, Arg, Dims, Executor};
use crate::device::Activation;

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
