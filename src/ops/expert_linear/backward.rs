//! The WEMoE linear layer's backward on the CPU: the input gradient and the router gradient, contracted tile by
//! tile along the forward's tiles.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::blocked::transpose_tile;
use super::stripes::{gather_stripes, pack_chunks};
use super::tiles::{dot_tiles, merge_tiles, multiply_tile};
use super::{ExpertLinearRef, Kernel, BLOCK_ROWS, CHUNK_INPUTS};

/// Backward of [`expert_linear`](super::expert_linear): `(dx, dc)` for the output gradient `dy` `[groups · n, out]`:
/// `dx_g = dy_g · W_gᵀ` and the router gradient `dc[g, t] = <τ_t, x_gᵀ·dy_g> + <β_t, Σ_rows dy_g>`. `dx` only when
/// `input_gradient`: without it neither its product nor the merge that feeds it runs (the first WEMoE layer's input
/// depends on no router; `cargo bench --bench cpu -- backward_fc1` times both). Both are contracted tile by tile
/// (`per_group_backward`), so neither a group's merged weight nor its `x_gᵀ·dy_g` is ever formed whole; for one group
/// (batch routing) too, where forming them would read the T + 1 sources and write two full matrices per call, then read
/// the product once per task vector (measured: one batch-routing adaptation step, loading included, about 8% faster
/// this way; BENCHMARKS.md).
pub fn expert_linear_backward(
    x: &[f32],
    groups: usize,
    n: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
    input_gradient: bool,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    check_backward("expert_linear_backward", x, groups, n, coefficients, w, dy)?;
    Ok(per_group_backward(x, groups, n, coefficients, w, dy, input_gradient, Kernel::detect()))
}

/// The shapes a backward of [`expert_linear`](super::expert_linear) takes, checked (`op` names the caller in the
/// error).
pub(super) fn check_backward(
    op: &str,
    x: &[f32],
    groups: usize,
    n: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
) -> Result<()> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    w.ensure_experts(op)?;
    ensure!(x.len() == groups * n * k, "{op}: input does not hold {groups}×{n}×{k}");
    ensure!(dy.len() == groups * n * o, "{op}: gradient does not hold {groups}×{n}×{o}");
    ensure!(coefficients.len() == groups * t, "{op}: coefficients are not [{groups}, {t}]");
    w.assert_blocked();
    Ok(())
}

/// Sums over the rows of `[rows, o]` in f64.
pub(super) fn column_sums(x: &[f32], o: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; o];
    for row in x.chunks_exact(o) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    sums
}

/// `<β_t, Σ_rows dy>`: a task's bias delta against the column sums of `dy`, in f64.
pub(super) fn bias_dot(bias: &[f32], colsum: &[f64]) -> f64 {
    bias.iter().zip(colsum).map(|(a, b)| *a as f64 * b).sum()
}

/// Per-group backward, tile by tile. Parallel over chunks of inputs (each owns its columns of `dx`); for each
/// block of 32 outputs, every group's merged tile is formed as in the forward and multiplied into `dx_g`
/// (transposed), and `x_gᵀ·dy_g` is formed for that tile only; then every group's such tile is contracted with
/// each task vector's tile while it is in cache, several groups per pass (`dot_tiles`: one group at a time read
/// the task vectors' tiles again for every group; BENCHMARKS.md).
/// Per-chunk partial `dc` are summed in chunk order, so results do not depend on the thread count. Without
/// `input_gradient` the merged tiles and `dx` are skipped.
#[allow(clippy::too_many_arguments)]
fn per_group_backward(
    x: &[f32],
    groups: usize,
    n: usize,
    c: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
    input_gradient: bool,
    kernel: Kernel,
) -> (Option<Vec<f32>>, Vec<f32>) {
    // A chunk of inputs is the output width of the transposed product into dx.
    const _: () = assert!(CHUNK_INPUTS == BLOCK_ROWS);
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    let kc = CHUNK_INPUTS;
    let chunks = k.div_ceil(kc);
    // dy by blocks of 32 outputs: [blocks, groups·n, 32], the last block zero-padded.
    let dy_blocks = pack_chunks(dy, groups * n, o, BLOCK_ROWS);
    let block_len = groups * n * BLOCK_ROWS;
    let tile_len = kc * BLOCK_ROWS;
    let parts: Vec<(Vec<f32>, Vec<f64>)> = (0..chunks)
        .into_par_iter()
        .map(|ci| {
            let k0 = ci * kc;
            let width = kc.min(k - k0);
            // This chunk's inputs of every group, transposed: [groups, width, n].
            let mut xt = vec![0.0f32; groups * width * n];
            for (g, dst) in xt.chunks_exact_mut(width * n).enumerate() {
                for r in 0..n {
                    let src = &x[(g * n + r) * k + k0..(g * n + r) * k + k0 + width];
                    src.iter().enumerate().for_each(|(i, &v)| dst[i * n + r] = v);
                }
            }
            let mut dx = if input_gradient { vec![0.0f32; groups * n * kc] } else { Vec::new() };
            let mut dc = vec![0.0f64; groups * t];
            let mut tiles = if input_gradient { vec![0.0f32; groups * tile_len] } else { Vec::new() };
            let mut transposed = [0.0f32; BLOCK_ROWS * BLOCK_ROWS];
            let mut outers = vec![0.0f32; groups * tile_len];
            let mut dots = vec![0.0f32; groups * t];
            for (bi, r0) in (0..o).step_by(BLOCK_ROWS).enumerate() {
                let rows = BLOCK_ROWS.min(o - r0);
                if input_gradient {
                    merge_tiles(kernel, w, c, k0..k0 + width, r0..r0 + rows, &mut tiles);
                }
                let dyb = &dy_blocks[bi * block_len..(bi + 1) * block_len];
                for g in 0..groups {
                    let dyg = &dyb[g * n * BLOCK_ROWS..(g + 1) * n * BLOCK_ROWS];
                    if input_gradient {
                        // dx_g[:, chunk] += dy_g[:, block] · M_gᵀ, with M_g's tile transposed to [outputs, inputs].
                        let tile: &[f32; BLOCK_ROWS * BLOCK_ROWS] =
                            tiles[g * tile_len..(g + 1) * tile_len].try_into().expect("a tile is 32 × 32");
                        transpose_tile(tile, &mut transposed);
                        let dxg = &mut dx[g * n * kc..(g + 1) * n * kc];
                        multiply_tile(kernel, dyg, n, BLOCK_ROWS, rows, &transposed[..rows * BLOCK_ROWS], dxg);
                    }
                    // x_g[:, chunk]ᵀ · dy_g[:, block], [width, 32].
                    let outer = &mut outers[g * tile_len..g * tile_len + width * BLOCK_ROWS];
                    outer.fill(0.0);
                    multiply_tile(kernel, &xt[g * width * n..(g + 1) * width * n], width, n, n, dyg, outer);
                }
                // Every group's x_gᵀ·dy_g tile against every task vector's tile.
                dot_tiles(kernel, w, k0..k0 + width, r0..r0 + rows, &outers, &mut dots);
                dc.iter_mut().zip(&dots).for_each(|(s, &d)| *s += d as f64);
            }
            (dx, dc)
        })
        .collect();
    combine_chunks(&parts, w, groups, n, dy, input_gradient)
}

/// The per-chunk results of a per-group backward, `(dx stripe [groups·n, 32], partial dc [groups, T] in f64)` in
/// chunk order: `dx` gathered from the stripes (when `input_gradient`; the stripes are empty otherwise), and
/// `dc` summed in chunk order (so that results do not depend on the thread count) plus each task's bias term
/// `<β_t, Σ_rows dy_g>`.
pub(super) fn combine_chunks(
    parts: &[(Vec<f32>, Vec<f64>)],
    w: &ExpertLinearRef,
    groups: usize,
    n: usize,
    dy: &[f32],
    input_gradient: bool,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    let dx = input_gradient
        .then(|| gather_stripes(&parts.iter().map(|(part, _)| part.as_slice()).collect::<Vec<_>>(), CHUNK_INPUTS, k));
    let mut dc = vec![0.0f64; groups * t];
    for (_, part_dc) in parts {
        dc.iter_mut().zip(part_dc).for_each(|(s, &d)| *s += d);
    }
    dc.par_chunks_mut(t).enumerate().for_each(|(g, dcg)| {
        let colsum = column_sums(&dy[g * n * o..(g + 1) * n * o], o);
        dcg.iter_mut().zip(&w.task_biases).for_each(|(d, tb)| *d += bias_dot(tb, &colsum));
    });
    (dx, dc.into_iter().map(|v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::expert_linear::test_weights::Weights;
    use crate::ops::gradcheck::values;

    /// The tiled per-group backward (both kernels) and the one-group path against the products in f64, on
    /// shapes that leave ragged chunks, blocks and merge passes: 10 groups of 5 rows, 37 inputs, 71 outputs,
    /// 11 experts (the router gradient's passes of 8 experts with AVX-512, of 4 with AVX2, the last ragged).
    /// Without the input gradient, no `dx` and the same `dc`, bit for bit.
    #[test]
    fn backward_paths_match_the_products_in_f64() {
        let (g, n, k, o, t) = (10, 5, 37, 71, 11);
        let weights = Weights::new(k, o, t);
        let (base_w, tw, tb) = (&weights.base_w, &weights.tw, &weights.tb);
        let w = weights.view();
        let (x, c, dy) = (values(g * n * k, 3), values(g * t, 4), values(g * n * o, 5));
        let check = |(dx, dc): (Option<Vec<f32>>, Vec<f32>), groups: usize, what: &str| {
            let dx = dx.unwrap_or_else(|| panic!("{what}: no dx"));
            for gi in 0..groups {
                let cg = &c[gi * t..(gi + 1) * t];
                let weight = |kk: usize, j: usize| {
                    base_w[kk * o + j] as f64 + (0..t).map(|e| cg[e] as f64 * tw[e][kk * o + j] as f64).sum::<f64>()
                };
                for r in 0..n {
                    let dyr = &dy[(gi * n + r) * o..(gi * n + r + 1) * o];
                    for kk in 0..k {
                        let want: f64 = (0..o).map(|j| dyr[j] as f64 * weight(kk, j)).sum();
                        let got = dx[(gi * n + r) * k + kk] as f64;
                        assert!((got - want).abs() < 1e-4, "{what}: dx group {gi} row {r} input {kk}: {got} vs {want}");
                    }
                }
                for e in 0..t {
                    let mut want = 0.0f64;
                    for r in 0..n {
                        let (xr, dyr) = (&x[(gi * n + r) * k..][..k], &dy[(gi * n + r) * o..][..o]);
                        for j in 0..o {
                            want += dyr[j] as f64 * tb[e][j] as f64;
                            want +=
                                (0..k).map(|kk| xr[kk] as f64 * tw[e][kk * o + j] as f64).sum::<f64>() * dyr[j] as f64;
                        }
                    }
                    let got = dc[gi * t + e] as f64;
                    assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{what}: dc[{gi}, {e}]: {got} vs {want}");
                }
            }
        };
        let without_dx = |(dx, dc): (Option<Vec<f32>>, Vec<f32>), with: &[f32], what: &str| {
            assert!(dx.is_none(), "{what}: a dx nobody asked for");
            assert_eq!(dc, with, "{what}: dc without dx");
        };
        for kernel in Kernel::all_available() {
            let all = per_group_backward(&x, g, n, &c, &w, &dy, true, kernel);
            let dc = all.1.clone();
            check(all, g, kernel.name());
            without_dx(per_group_backward(&x, g, n, &c, &w, &dy, false, kernel), &dc, kernel.name());
            // One group: batch routing's backward.
            let one = per_group_backward(&x[..n * k], 1, n, &c[..t], &w, &dy[..n * o], true, kernel);
            let dc = one.1.clone();
            check(one, 1, &format!("{}, one group", kernel.name()));
            let one = per_group_backward(&x[..n * k], 1, n, &c[..t], &w, &dy[..n * o], false, kernel);
            without_dx(one, &dc, &format!("{}, one group", kernel.name()));
        }
        check(expert_linear_backward(&x, g, n, &c, &w, &dy, true).unwrap(), g, "expert_linear_backward");
    }

    #[test]
    fn backward_matches_finite_differences_for_input_and_coefficients() {
        use crate::ops::gradcheck::{assert_gradient, f64s, numeric_gradient};
        let (g, n, k, o, t) = (2, 3, 5, 7, 3);
        let weights = Weights::new(k, o, t);
        let (base_w, base_b, tw, tb) = (&weights.base_w, &weights.base_b, &weights.tw, &weights.tb);
        let w = weights.view();
        let (x, c, dy) = (values(g * n * k, 3), values(g * t, 4), values(g * n * o, 5));
        // loss = Σ dy ∘ y, in f64; weights [in, out].
        let loss = |x: &[f64], c: &[f64]| -> f64 {
            let mut total = 0.0;
            for gi in 0..g {
                for r in 0..n {
                    for j in 0..o {
                        let mut y = base_b[j] as f64 + (0..t).map(|e| c[gi * t + e] * tb[e][j] as f64).sum::<f64>();
                        for kk in 0..k {
                            let wv = base_w[kk * o + j] as f64
                                + (0..t).map(|e| c[gi * t + e] * tw[e][kk * o + j] as f64).sum::<f64>();
                            y += x[(gi * n + r) * k + kk] * wv;
                        }
                        total += dy[(gi * n + r) * o + j] as f64 * y;
                    }
                }
            }
            total
        };
        let (xf, cf) = (f64s(&x), f64s(&c));
        let (dx, dc) = expert_linear_backward(&x, g, n, &c, &w, &dy, true).unwrap();
        let dx = dx.expect("dx asked for");
        assert_gradient("dx", &dx, &numeric_gradient(&|v| loss(v, &cf), &xf), 1e-5);
        assert_gradient("dc", &dc, &numeric_gradient(&|v| loss(&xf, v), &cf), 1e-5);
    }
}
