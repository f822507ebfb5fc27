//! The WEMoE linear layer's forward with bf16 products (`--precision bf16` on the CPU): each group's tile merged
//! in f32 as on the f32 path, rounded into that group's bf16 panel, multiplied by `ops::bf16`'s units.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::stripes::gather_stripes;
use super::{ExpertLinearRef, BLOCK_ROWS, CHUNK_INPUTS, GROUPS_PER_PASS};
use crate::ops::bf16;

/// [`expert_linear`](super::expert_linear) with bf16 products (`ops::bf16`: `--precision bf16` on the CPU; refused
/// unless [`bf16::available`]). As in the f32 per-group path, every group's merged tile is formed in f32 from the
/// cache-resident source tiles, eight groups per pass over them; here each is rounded straight into that group's bf16
/// panel of the block's 32 outputs over all inputs (48 KiB at 768 inputs, so eight stay in L2), and once a pass's
/// panels are whole, each group's rows (rounded once per call) are multiplied with its panel, the accumulators in tiles
/// for the whole reduction. Each group's weight is rounded to bf16 after merging, as on the GPU.
pub fn expert_linear_bf16(x: &[f32], groups: usize, n: usize, c: &[f32], w: &ExpertLinearRef) -> Result<Vec<f32>> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    w.ensure_experts("expert_linear_bf16")?;
    ensure!(x.len() == groups * n * k, "expert_linear_bf16: input does not hold {groups}×{n}×{k}");
    ensure!(c.len() == groups * t, "expert_linear_bf16: coefficients are not [{groups}, {t}]");
    ensure!(bf16::available(), "bf16 products need {}", bf16::unavailable_reason());
    w.assert_blocked();
    if groups == 1 && n >= WHOLE_MERGE_ROWS {
        return merged_then_multiplied(x, n, c, w);
    }
    let kc = CHUNK_INPUTS;
    let rows: Vec<Vec<u16>> = x.par_chunks(n * k).map(|xg| bf16::pack_rows(xg, n, k)).collect();
    let panel_len = bf16::panel_len(k);
    let blocks: Vec<usize> = (0..o).step_by(BLOCK_ROWS).collect();
    // A pass's panels (1.5 MiB at 3072 inputs) made once per rayon job, not per block: freed and made again
    // per block, their pages were faulted in afresh each time.
    let scratch = || vec![0u16; GROUPS_PER_PASS * panel_len];
    let parts: Vec<Vec<f32>> = blocks
        .par_iter()
        .map_init(scratch, |panels, &r0| {
            let cols = BLOCK_ROWS.min(o - r0);
            let mut part = vec![0.0f32; groups * n * BLOCK_ROWS];
            let session = bf16::TileSession::start();
            for g0 in (0..groups).step_by(GROUPS_PER_PASS) {
                let count = GROUPS_PER_PASS.min(groups - g0);
                let cs = &c[g0 * t..(g0 + count) * t];
                for k0 in (0..k).step_by(kc) {
                    merge_panels_bf16(w, cs, k0, kc.min(k - k0), r0, panels, panel_len);
                }
                for (s, panel) in panels.chunks_exact(panel_len).take(count).enumerate() {
                    let g = g0 + s;
                    let mut bias = [0.0f32; BLOCK_ROWS];
                    w.merge_bias(&c[g * t..(g + 1) * t], r0..r0 + cols, &mut bias[..cols]);
                    let out = &mut part[g * n * BLOCK_ROWS..(g + 1) * n * BLOCK_ROWS];
                    bf16::multiply_panel(&session, &rows[g], n, k, panel, &bias, out, BLOCK_ROWS, BLOCK_ROWS);
                }
            }
            part
        })
        .collect();
    Ok(gather_stripes(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>(), BLOCK_ROWS, o))
}

/// Rows from which one group (batch routing's usual case) is merged whole before one product: the panel path
/// above reads every row once per block of 32 outputs (4.9 MB of bf16 rows 96 times at B/32's 3200 × 768 → 3072,
/// from L3), the product once per chunk of outputs that its cache holds.
const WHOLE_MERGE_ROWS: usize = 256;

/// One group's weight merged into every panel of a packed right-hand side (the same merge, rounded the same
/// way), then one `bf16::linear`: the same tiles summed in the same order as the panel path, so the same bits.
fn merged_then_multiplied(x: &[f32], n: usize, c: &[f32], w: &ExpertLinearRef) -> Result<Vec<f32>> {
    let (k, o) = (w.in_features, w.out_features);
    let panel_len = bf16::panel_len(k);
    let mut data = vec![0u16; panel_len * o.div_ceil(BLOCK_ROWS)];
    data.par_chunks_mut(panel_len).enumerate().for_each(|(b, panel)| {
        for k0 in (0..k).step_by(CHUNK_INPUTS) {
            merge_panels_bf16(w, c, k0, CHUNK_INPUTS.min(k - k0), b * BLOCK_ROWS, panel, panel_len);
        }
    });
    let mut bias = vec![0.0f32; o];
    w.merge_bias(c, 0..o, &mut bias);
    bf16::linear(x, n, k, &bf16::PackedRhs::from_panels(data, k, o), Some(&bias))
}

/// The merge of a pass's bf16 panels (the AVX-512 path's `merge_panels_bf16`). A bf16 unit implies x86-64;
/// elsewhere [`expert_linear_bf16`] refuses before coming here.
fn merge_panels_bf16(
    w: &ExpertLinearRef,
    c: &[f32],
    k0: usize,
    width: usize,
    r0: usize,
    panels: &mut [u16],
    panel_len: usize,
) {
    assert!(bf16::available(), "bf16 panels merged without a bf16 unit");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a bf16 unit is available (asserted), and with it AVX-512 BF16 and BW; bounds are asserted inside.
    unsafe {
        super::avx512::merge_panels_bf16(w, c, k0, width, r0, panels, panel_len)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, c, k0, width, r0, panels, panel_len);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::expert_linear::test_weights::Weights;
    use crate::ops::expert_linear::tiles::merge_tiles;
    use crate::ops::expert_linear::{expert_linear, Kernel};
    use crate::ops::gradcheck::values;

    /// The bf16 per-group path against the f64 sum of the rounded operands' products: each group's
    /// weight merged in f32 as the kernel merges it, then rounded; 10 groups (two merge passes) of 27 rows, 45
    /// inputs, 71 outputs (ragged chunks, blocks and row tiles), 3 experts; and one group of 300 rows. What is
    /// left is f32 accumulation.
    #[test]
    fn bf16_path_equals_the_rounded_operands_products() {
        if !crate::ops::bf16::available() {
            return; // the CPU backend refuses bf16 here (tests/wemoe_fusionbench.rs checks the refusal)
        }
        equals_the_rounded_operands_products(10, 27, 45, 71, 3);
        // One group of many rows: merged whole, then one product.
        equals_the_rounded_operands_products(1, WHOLE_MERGE_ROWS + 44, 45, 71, 3);
    }

    /// One group merged whole gives the bits of the per-group panels: the same group twice takes the panel path.
    #[test]
    fn one_group_merged_whole_equals_its_panels() {
        if !crate::ops::bf16::available() {
            return;
        }
        let (n, k, o, t) = (WHOLE_MERGE_ROWS + 5, 70, 45, 4);
        let weights = Weights::new(k, o, t);
        let (x, c) = (values(n * k, 5), values(t, 6));
        let whole = expert_linear_bf16(&x, 1, n, &c, &weights.view()).unwrap();
        let twice = expert_linear_bf16(&[x.clone(), x].concat(), 2, n, &[c.clone(), c].concat(), &weights.view());
        let twice = twice.unwrap();
        assert!(whole == twice[..n * o] && whole == twice[n * o..], "the two paths differ");
    }

    fn equals_the_rounded_operands_products(g: usize, n: usize, k: usize, o: usize, t: usize) {
        let weights = Weights::new(k, o, t);
        let w = weights.view();
        let (x, c) = (values(g * n * k, 3), values(g * t, 4));
        let y = expert_linear_bf16(&x, g, n, &c, &w).unwrap();
        // The merge whose fused multiply-adds the bf16 path repeats (a bf16 unit implies AVX-512).
        #[cfg(target_arch = "x86_64")]
        let merge_kernel = Kernel::Avx512;
        #[cfg(not(target_arch = "x86_64"))]
        let merge_kernel = Kernel::Portable;
        let bf16 = |v: f32| half::bf16::from_f32(v).to_f64();
        let (mut worst, mut scale) = (0.0f64, 0.0f64);
        for gi in 0..g {
            let cg = &c[gi * t..(gi + 1) * t];
            // The merged weight [k, o] exactly as the kernel's merge forms it, tile by tile.
            let mut merged = vec![0.0f32; k * o];
            for r0 in (0..o).step_by(BLOCK_ROWS) {
                let cols = BLOCK_ROWS.min(o - r0);
                for k0 in (0..k).step_by(CHUNK_INPUTS) {
                    let width = CHUNK_INPUTS.min(k - k0);
                    let mut tile = vec![0.0f32; CHUNK_INPUTS * BLOCK_ROWS];
                    merge_tiles(merge_kernel, &w, cg, k0..k0 + width, r0..r0 + cols, &mut tile);
                    for kk in 0..width {
                        merged[(k0 + kk) * o + r0..][..cols].copy_from_slice(&tile[kk * BLOCK_ROWS..][..cols]);
                    }
                }
            }
            let mut bias = vec![0.0f32; o];
            w.merge_bias(cg, 0..o, &mut bias);
            for r in 0..n {
                for j in 0..o {
                    let xr = &x[(gi * n + r) * k..][..k];
                    let want = bias[j] as f64 + (0..k).map(|kk| bf16(xr[kk]) * bf16(merged[kk * o + j])).sum::<f64>();
                    worst = worst.max((y[(gi * n + r) * o + j] as f64 - want).abs());
                    scale = scale.max(want.abs());
                }
            }
        }
        assert!(worst <= 1e-6 * scale, "off by {worst:e} of {scale:e}");
        // And really rounded: the f32 path differs by more than its own error.
        let exact = expert_linear(&x, g, n, &c, &w).unwrap();
        let off = y.iter().zip(&exact).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(off > 1e-4 * scale, "the bf16 path equals the f32 one: not rounded?");
    }
}
