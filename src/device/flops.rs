//! The floating-point operations of the backend operations' matrix products, two per multiply-add, counted
//! from their shapes for the rates `WEMOE_OP_TIMES` reports ([`op_times`](super::op_times)). Each counts what
//! the operation computes by its definition, whatever its kernels do around it (a merge of expert weights,
//! a bias, a padded tile), so that every backend counts the same work and the rate compares with a dense
//! GEMM's on the same device.

/// `rows × inp` times `inp × out`: a linear layer, its input gradient (`rows × out` times `out × inp`), its
/// weight gradient (`out × rows` times `rows × inp`), a WEMoE layer with its merged weights, a patch embedding.
pub fn product(rows: usize, inp: usize, out: usize) -> f64 {
    2.0 * rows as f64 * inp as f64 * out as f64
}

/// The backward of a WEMoE linear layer of `rows` rows: each group's `xᵀ·dy`, which the task vectors are
/// contracted with (that contraction, like the merge, not counted), and with `input_gradient` the input
/// gradient through each group's merged weight.
pub fn expert_linear_backward(rows: usize, inp: usize, out: usize, input_gradient: bool) -> f64 {
    (1.0 + f64::from(u8::from(input_gradient))) * product(rows, inp, out)
}

/// Attention over `batch` samples of `tokens` tokens, `width` wide (all heads together): `Q·Kᵀ` and `P·V`.
pub fn attention(batch: usize, tokens: usize, width: usize) -> f64 {
    2.0 * product(batch * tokens, width, tokens)
}

/// Attention's backward, its probabilities recomputed: `Q·Kᵀ` again, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dQ = dS·K`
/// and `dK = dSᵀ·Q`.
pub fn attention_backward(batch: usize, tokens: usize, width: usize) -> f64 {
    5.0 * product(batch * tokens, width, tokens)
}
