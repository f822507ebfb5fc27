//! The backward of the WEMoE linear layer with bf16 products (`ops::bf16`, `--precision bf16` on the CPU): the
//! f32 paths' algorithms ([`super::expert_linear_backward`]), their products in bf16 blocks. Batch routing (one
//! group) merges each weight panel once; per-sample routing keeps the f32 path's tiles, merged in f32 for
//! every group while the source tiles are in cache, and multiplies each group's tile in bf16.

use anyhow::{ensure, Result};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::backward::{bias_dot, check_backward, column_sums, combine_chunks};
use super::stripes::pack_chunks;
use super::tiles::{dot_tile, merge_tiles};
use super::{ExpertLinearRef, Kernel, BLOCK_ROWS, CHUNK_INPUTS};
use crate::ops::bf16;
use crate::ops::gemm::MatRef;

/// Backward of [`super::expert_linear`] as [`super::expert_linear_backward`] computes it, `(dx, dc)`, with
/// bf16 operands (rounded to nearest even) and f32 accumulation: `dx_g = dy_g · M_gᵀ` from each group's merged
/// weight rounded after merging, and the router gradient's `x_gᵀ·dy_g` from `x` and `dy` rounded, contracted
/// with the f32 task vectors; `dx` only when `input_gradient`. Refused unless [`bf16::available`].
pub fn expert_linear_backward_bf16(
    x: &[f32],
    groups: usize,
    n: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
    input_gradient: bool,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    check_backward("expert_linear_backward_bf16", x, groups, n, coefficients, w, dy)?;
    ensure!(bf16::available(), "bf16 products need {}", bf16::unavailable_reason());
    if groups == 1 {
        return one_group(x, n, coefficients, w, dy, input_gradient);
    }
    Ok(per_group(x, groups, n, coefficients, w, dy, input_gradient))
}

/// Per-sample routing's backward: the f32 path's loop (`per_group_backward`: parallel over chunks of 32
/// inputs, each owning its columns of `dx`; for each block of 32 outputs every group's merged tile formed in
/// f32 from the cache-resident source tiles) with each group's two products on the tiles.
/// `x_g[:, chunk]ᵀ·dy_g[:, block]` reduces over the group's rows into a 32 × 32 tile that is contracted with
/// every task vector's tile as in f32. `dx_g[:, chunk] += dy_g[:, blocks]·tilesᵀ` takes [`SPAN`] blocks' merged
/// tiles, transposed and rounded, as the steps of one product, its accumulators (rows padded to 32) loaded from
/// and stored to the chunk's `dx` once per span. `dy` is rounded once per call: each group's rows as a left
/// operand, and each group's block as a right one. Without `input_gradient`, no tile is merged and no `dx`
/// formed.
fn per_group(
    x: &[f32],
    groups: usize,
    n: usize,
    c: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
    input_gradient: bool,
) -> (Option<Vec<f32>>, Vec<f32>) {
    const TILE: usize = BLOCK_ROWS * BLOCK_ROWS;
    const HALF: usize = TILE / 2; // bf16 elements of one tile
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    let (kc, np) = (CHUNK_INPUTS, n.next_multiple_of(BLOCK_ROWS));
    let blocks = o.div_ceil(BLOCK_ROWS);
    // Each group's dy rounded as the left operand of `dy·Mᵀ`: [np/16 row tiles][blocks][16][32].
    let rows_len = np * blocks * BLOCK_ROWS;
    let mut dy_rows = vec![0u16; if input_gradient { groups * rows_len } else { 0 }];
    dy_rows
        .par_chunks_mut(rows_len)
        .zip(dy.par_chunks(n * o))
        .for_each(|(out, dyg)| bf16::pack_rows_into(MatRef::row_major(dyg, n, o).expect("a group's rows"), out));
    // Each group's block of 32 outputs as the right operand of `xᵀ·dy` (its rows reduced over): [blocks, groups].
    let dy_blocks = pack_chunks(dy, groups * n, o, BLOCK_ROWS);
    let len = np * BLOCK_ROWS;
    let mut dy_rhs = vec![0u16; blocks * groups * len];
    dy_rhs.par_chunks_mut(len).zip(dy_blocks.par_chunks(n * BLOCK_ROWS)).for_each(|(out, block)| {
        bf16::pack_rhs_into(block, n, BLOCK_ROWS, out);
    });
    let kernel = Kernel::detect();
    let parts: Vec<(Vec<f32>, Vec<f64>)> = (0..k.div_ceil(kc))
        .into_par_iter()
        .map(|ci| {
            let session = bf16::TileSession::start();
            let (k0, width) = (ci * kc, kc.min(k - ci * kc));
            // This chunk's inputs of every group, transposed ([width, n]: a strided view) and rounded as a left
            // operand.
            let mut x_rows = vec![0u16; groups * BLOCK_ROWS * np];
            for (g, dst) in x_rows.chunks_exact_mut(BLOCK_ROWS * np).enumerate() {
                let xt = MatRef::strided(&x[g * n * k + k0..], width, n, 1, k).expect("the group's rows");
                bf16::pack_rows_into(xt, dst);
            }
            // Without the input gradient there are no tiles, spans or `dx` to hold (the loop over spans is empty).
            let dx_groups = if input_gradient { groups } else { 0 };
            let mut dx = vec![0.0f32; dx_groups * np * kc];
            let mut dc = vec![0.0f64; groups * t];
            let mut tiles = vec![0.0f32; dx_groups * TILE];
            // Each group's span of transposed tiles: [2 halves of 16 inputs][SPAN steps][512].
            let mut spans = vec![0u16; dx_groups * SPAN * TILE];
            let (mut outer, mut dots) = ([0.0f32; TILE], vec![0.0f32; t]);
            for b0 in (0..blocks).step_by(SPAN) {
                let steps = SPAN.min(blocks - b0);
                for s in 0..steps {
                    let (bi, r0) = (b0 + s, (b0 + s) * BLOCK_ROWS);
                    let cols = r0..(r0 + BLOCK_ROWS).min(o);
                    if input_gradient {
                        merge_tiles(kernel, w, c, k0..k0 + width, cols.clone(), &mut tiles);
                    }
                    for g in 0..groups {
                        if input_gradient {
                            let tile = &tiles[g * TILE..(g + 1) * TILE];
                            let (h0, h1) = spans[g * SPAN * TILE..(g + 1) * SPAN * TILE].split_at_mut(SPAN * HALF);
                            let halves = [&mut h0[s * HALF..][..HALF], &mut h1[s * HALF..][..HALF]];
                            bf16::pack_transposed_tile(tile, halves);
                        }
                        // x_g[:, chunk]ᵀ · dy_g[:, block] over the group's rows, then its dot with every task vector.
                        let xr = &x_rows[g * BLOCK_ROWS * np..(g + 1) * BLOCK_ROWS * np];
                        let at = (bi * groups + g) * len;
                        let (r_lo, r_hi) = dy_rhs[at..at + len].split_at(len / 2);
                        let a = [xr, &xr[BLOCK_ROWS / 2 * np..]];
                        bf16::multiply_block_into(&session, a, [r_lo, r_hi], np / BLOCK_ROWS, &mut outer);
                        dot_tile(kernel, w, k0..k0 + width, cols.clone(), &outer, &mut dots);
                        dc[g * t..(g + 1) * t].iter_mut().zip(&dots).for_each(|(s, &d)| *s += d as f64);
                    }
                }
                // dx_g[:, chunk] += dy_g[:, span's blocks] · tilesᵀ, 32 rows at a time.
                for (g, span) in spans.chunks_exact(SPAN * TILE).enumerate() {
                    let (h0, h1) = span.split_at(SPAN * HALF);
                    let dyr = &dy_rows[g * rows_len..(g + 1) * rows_len];
                    let dxg = &mut dx[g * np * kc..(g + 1) * np * kc];
                    for (rb, block) in dxg.chunks_exact_mut(BLOCK_ROWS * kc).enumerate() {
                        let a = [2 * rb, 2 * rb + 1].map(|j| &dyr[(j * blocks + b0) * HALF..]);
                        bf16::accumulate_block(&session, a, [h0, h1], steps, block, kc);
                    }
                }
            }
            // The padded rows dropped: [groups·n, 32].
            let dx: Vec<f32> = dx.chunks_exact(np * kc).flat_map(|group| group[..n * kc].iter().copied()).collect();
            (dx, dc)
        })
        .collect();
    combine_chunks(&parts, w, groups, n, dy, input_gradient)
}

/// Output blocks whose transposed merged tiles one accumulation of `dx` takes as its steps: each load and store
/// of a group's accumulators then serves this many blocks.
const SPAN: usize = 4;

/// Batch routing's backward (one group of `n` rows): `dx = dy·Mᵀ` with `Mᵀ` merged and packed panel by panel
/// from the blocked sources (`pack_merged_transposed`), and the router gradient
/// `dc[t] = <τ_t, xᵀ·dy> + <β_t, Σ_rows dy>` block by block: each block of 32 outputs of `xᵀ·dy` is
/// multiplied on the tiles into the blocked layout (`[in, 32]`, 96 KiB at 768 inputs, so it stays in L2) and
/// contracted with every task vector's block while there, as the f32 path's tiles are; never formed whole.
fn one_group(
    x: &[f32],
    n: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
    input_gradient: bool,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    let dx = match input_gradient {
        true => Some(bf16::linear(dy, n, o, &pack_merged_transposed(w, coefficients), None)?),
        false => None,
    };
    let xt = bf16::pack_rows_view(MatRef::row_major(x, n, k)?.t());
    let dy_packed = bf16::pack_rhs(dy, n, o)?;
    let kernel = Kernel::detect();
    let blocks: Vec<Vec<f64>> = (0..o.div_ceil(BLOCK_ROWS))
        .into_par_iter()
        .map_init(
            || vec![0.0f32; k * BLOCK_ROWS],
            |outer, b| {
                let session = bf16::TileSession::start();
                let panel = dy_packed.block_panel(b);
                bf16::multiply_panel(&session, &xt, k, n, panel, &[0.0; BLOCK_ROWS], outer, BLOCK_ROWS, BLOCK_ROWS);
                let cols = b * BLOCK_ROWS..(b * BLOCK_ROWS + BLOCK_ROWS).min(o);
                let (mut dc, mut dots) = (vec![0.0f64; t], vec![0.0f32; t]);
                for k0 in (0..k).step_by(CHUNK_INPUTS) {
                    let ks = k0..(k0 + CHUNK_INPUTS).min(k);
                    dot_tile(kernel, w, ks, cols.clone(), &outer[k0 * BLOCK_ROWS..], &mut dots);
                    dc.iter_mut().zip(&dots).for_each(|(s, &d)| *s += d as f64);
                }
                dc
            },
        )
        .collect();
    let colsum = column_sums(dy, o);
    let dc = (0..t)
        .map(|e| (blocks.iter().map(|dc| dc[e]).sum::<f64>() + bias_dot(w.task_biases[e], &colsum)) as f32)
        .collect();
    Ok((dx, dc))
}

/// The merged weight for coefficients `c` (one group), transposed and packed for the bf16 product `dy·Mᵀ`:
/// merged and rounded panel by panel straight from the blocked sources (the AVX-512 path's
/// `merge_transposed_panel`), never formed whole in f32. A bf16 unit implies x86-64; elsewhere
/// [`expert_linear_backward_bf16`] refuses before coming here.
fn pack_merged_transposed(w: &ExpertLinearRef, c: &[f32]) -> bf16::PackedRhs {
    assert!(bf16::available(), "bf16 panels merged without a bf16 unit");
    let (k, o) = (w.in_features, w.out_features);
    let panel_len = bf16::rhs_panel_len(o);
    let mut data = vec![0u16; panel_len * k.div_ceil(BLOCK_ROWS) * 2];
    data.par_chunks_mut(panel_len).enumerate().for_each(|(p, panel)| {
        let c0 = p * 16;
        if c0 >= k {
            return; // the padding past the last input stays zero
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a bf16 unit is available (asserted), and with it AVX-512 BF16 and BW; bounds are asserted inside.
        unsafe {
            avx512::merge_transposed_panel(w, c, c0, panel)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (w, c, c0, panel);
    });
    bf16::PackedRhs::from_panels(data, o, k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::expert_linear::expert_linear_backward;
    use crate::ops::expert_linear::test_weights::Weights;
    use crate::ops::gradcheck::values;

    /// The bf16 backward against the f64 sums of the rounded operands' products: `dx` from `dy` and each
    /// group's merged weight (merged with the kernels' fused multiply-adds, in their order) rounded, `dc` from `x`
    /// and `dy` rounded against the f32 task vectors. Per-sample routing's path on 10 groups of 27 rows and
    /// batch routing's on one group of 45 rows; 37 inputs, 171 outputs (ragged chunks, blocks and row tiles, and
    /// a whole span of blocks and a partial one), 3 experts. And really rounded: the f32 path differs. Without the
    /// input gradient, no `dx` and the same `dc`, bit for bit.
    #[test]
    fn bf16_backward_equals_the_rounded_operands_products() {
        if !crate::ops::bf16::available() {
            return; // the CPU backend refuses bf16 here (tests/wemoe_fusionbench.rs checks the refusal)
        }
        let (k, o, t) = (37, 171, 3);
        let weights = Weights::new(k, o, t);
        let (tw, tb) = (&weights.tw, &weights.tb);
        let w = weights.view();
        let bf16 = |v: f32| half::bf16::from_f32(v).to_f64();
        for (g, n) in [(10, 27), (1, 45)] {
            let (x, c, dy) = (values(g * n * k, 3), values(g * t, 4), values(g * n * o, 5));
            let (dx, dc) = expert_linear_backward_bf16(&x, g, n, &c, &w, &dy, true).unwrap();
            let dx = dx.expect("dx asked for");
            let (no_dx, same_dc) = expert_linear_backward_bf16(&x, g, n, &c, &w, &dy, false).unwrap();
            assert!(no_dx.is_none() && same_dc == dc, "{g} groups: without dx, none and the same dc");
            let (exact_dx, exact_dc) = expert_linear_backward(&x, g, n, &c, &w, &dy, true).unwrap();
            let exact = (exact_dx.expect("dx asked for"), exact_dc);
            let (mut worst, mut scale) = (0.0f64, 0.0f64);
            for gi in 0..g {
                let cg = &c[gi * t..(gi + 1) * t];
                let merged: Vec<f32> = (0..k * o)
                    .map(|i| tw.iter().zip(cg).fold(weights.base_w[i], |acc, (tau, &ct)| ct.mul_add(tau[i], acc)))
                    .collect();
                let (xg, dyg) = (&x[gi * n * k..(gi + 1) * n * k], &dy[gi * n * o..(gi + 1) * n * o]);
                for r in 0..n {
                    for kk in 0..k {
                        let want: f64 = (0..o).map(|j| bf16(dyg[r * o + j]) * bf16(merged[kk * o + j])).sum();
                        worst = worst.max((dx[(gi * n + r) * k + kk] as f64 - want).abs());
                        scale = scale.max(want.abs());
                    }
                }
                for e in 0..t {
                    let mut want = 0.0f64;
                    for j in 0..o {
                        let column: f64 = (0..n).map(|r| dyg[r * o + j] as f64).sum();
                        want += column * tb[e][j] as f64;
                        for kk in 0..k {
                            let outer: f64 = (0..n).map(|r| bf16(xg[r * k + kk]) * bf16(dyg[r * o + j])).sum();
                            want += outer * tw[e][kk * o + j] as f64;
                        }
                    }
                    let got = dc[gi * t + e] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{g} groups: dc[{gi}, {e}]: {got} vs {want}"
                    );
                    let f32_path = exact.1[gi * t + e] as f64;
                    assert!(
                        (got - f32_path).abs() > 1e-6 * want.abs(),
                        "{g} groups: dc[{gi}, {e}] equals the f32 path's"
                    );
                }
            }
            assert!(worst <= 1e-6 * scale, "{g} groups: dx off by {worst:e} of {scale:e}");
            let off = dx.iter().zip(&exact.0).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
            assert!(off > 1e-4 * scale, "{g} groups: dx equals the f32 path's: not rounded?");
        }
    }
}
