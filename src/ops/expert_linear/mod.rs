//! WEMoE's linear layer with per-group merged weights:
//! `y_g = x_g · (W0 + Σ_t c[g,t] τ_t)ᵀ + (b0 + Σ_t c[g,t] β_t)` for each group `g` of rows of `x`
//! (a sample in per-sample routing; the whole batch in batch routing).
//!
//! Formulation, chosen by measurement (BENCHMARKS.md): the weight is merged in tiles of 32 outputs × an
//! input chunk small enough that the T+1 source tiles stay in L2; each tile is merged once per group and
//! multiplied at once by a micro-kernel, so the task vectors are read from memory once per call, not once
//! per sample, and no whole per-sample weight is ever materialised. With one group (batch routing) each tile
//! is merged once, in cache, which also beat merging the whole weight and multiplying densely, except on the
//! portable path, which does the latter (`single_merge`). The backward walks the same tiles: each group's
//! merged tile feeds its input gradient, and its `xᵀ·dy` exists one tile at a time, contracted with the task
//! vectors' tiles while they are in cache. [`expert_mlp`] runs the two layers of the MLP and the activation
//! between them without leaving the tiles' layout in between.
//!
//! Here: the layer's weights ([`ExpertLinearRef`]) and the entry points. Beside it: the weights' layout
//! (`blocked.rs`), which kernel set runs (`kernel.rs`: AVX-512 in `avx512.rs`, AVX2 with FMA in `avx2.rs`, or
//! plain Rust, chosen at run time; `WEMOE_MAX_CPU_ISA` caps it), the operations on one tile (`tiles.rs`), the
//! forward on the tiles (`stripes.rs`), the backward (`backward.rs`), and both with bf16 products
//! (`forward_bf16.rs`, `backward_bf16.rs`).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::activation::{activation_in_place, activation_in_place_on_this_thread};
use super::gemm::MatRef;
use crate::device::Activation;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod backward;
mod backward_bf16;
mod blocked;
mod forward_bf16;
mod kernel;
mod stripes;
#[cfg(test)]
mod test_weights;
mod tiles;

pub use backward::expert_linear_backward;
pub use backward_bf16::expert_linear_backward_bf16;
pub use blocked::{blocked_shape, to_blocked};
pub use forward_bf16::expert_linear_bf16;
pub(crate) use kernel::Kernel;
pub use kernel::MAX_ISA_ENV;

use blocked::blocked_len;
use stripes::{gather_blocks, pack_chunks, per_group, per_group_stripes};
use tiles::merge_tiles;

/// The weights of one WEMoE linear layer, as the CPU backend prepares them: each weight in the blocked layout
/// of [`to_blocked`], so that a tile of 32 outputs × a chunk of inputs is one contiguous run of memory.
pub struct ExpertLinearRef<'a> {
    /// Pretrained weight, blocked.
    pub base_weight: &'a [f32],
    /// Pretrained bias `[out]`.
    pub base_bias: &'a [f32],
    /// Each task's weight delta, blocked.
    pub task_weights: Vec<&'a [f32]>,
    /// Each task's bias delta `[out]`.
    pub task_biases: Vec<&'a [f32]>,
    /// Output width.
    pub out_features: usize,
    /// Input width.
    pub in_features: usize,
}

impl ExpertLinearRef<'_> {
    /// Number of experts, T.
    pub fn experts(&self) -> usize {
        self.task_weights.len()
    }

    /// Where input `kk`'s outputs from `col` on start in a blocked weight (they run to the end of `col`'s block).
    fn offset(&self, kk: usize, col: usize) -> usize {
        ((col / BLOCK_ROWS) * self.in_features + kk) * BLOCK_ROWS + col % BLOCK_ROWS
    }

    /// Fails without task vectors: the coefficients `[groups, T]` would say nothing of the groups, and a layer
    /// with no expert is a dense one (`op` names the caller in the error).
    fn ensure_experts(&self, op: &str) -> Result<()> {
        ensure!(self.experts() > 0, "{op}: no task vectors (a WEMoE layer has at least one expert)");
        Ok(())
    }

    /// Panics unless every weight holds a whole blocked layout (what the unchecked kernels rely on).
    fn assert_blocked(&self) {
        let len = blocked_len(self.out_features, self.in_features);
        assert!(
            self.base_weight.len() == len && self.task_weights.iter().all(|tw| tw.len() == len),
            "expert linear weights are not blocked {}×{}",
            self.out_features,
            self.in_features
        );
    }

    /// Outputs `cols` of the merged bias for coefficients `c`.
    fn merge_bias(&self, c: &[f32], cols: std::ops::Range<usize>, b: &mut [f32]) {
        b.copy_from_slice(&self.base_bias[cols.clone()]);
        for (tb, &ct) in self.task_biases.iter().zip(c) {
            b.iter_mut().zip(&tb[cols.clone()]).for_each(|(b, t)| *b += ct * t);
        }
    }

    /// Inputs `ks` × outputs `cols` (within one block) of the merged weight for coefficients `c`, into `tile`
    /// with row stride `stride` (columns past `cols` are left as they are).
    fn merge_tile(
        &self,
        c: &[f32],
        ks: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        tile: &mut [f32],
        stride: usize,
    ) {
        debug_assert!(cols.end <= (cols.start / BLOCK_ROWS + 1) * BLOCK_ROWS, "a tile lies within one block");
        for (i, kk) in ks.enumerate() {
            let off = self.offset(kk, cols.start);
            let span = off..off + cols.len();
            let dst = &mut tile[i * stride..i * stride + cols.len()];
            dst.copy_from_slice(&self.base_weight[span.clone()]);
            for (tw, &ct) in self.task_weights.iter().zip(c) {
                dst.iter_mut().zip(&tw[span.clone()]).for_each(|(d, t)| *d += ct * t);
            }
        }
    }

    /// `dots[t] = Σ_{kk ∈ ks, j ∈ cols} τ_t[kk, j] · tile[kk - ks.start, j - cols.start]`, for a tile with row
    /// stride 32 (summed in f32: a tile holds at most 32 × 32 products).
    fn dot_tile(&self, ks: std::ops::Range<usize>, cols: std::ops::Range<usize>, tile: &[f32], dots: &mut [f32]) {
        for (d, tw) in dots.iter_mut().zip(&self.task_weights) {
            let mut lanes = [0.0f32; BLOCK_ROWS];
            for (i, kk) in ks.clone().enumerate() {
                let src = &tw[self.offset(kk, cols.start)..][..cols.len()];
                let row = &tile[i * BLOCK_ROWS..i * BLOCK_ROWS + cols.len()];
                lanes.iter_mut().zip(src.iter().zip(row)).for_each(|(l, (a, b))| *l += a * b);
            }
            *d = lanes.iter().sum();
        }
    }

    /// The whole merged weight, `[in, out]` (row-major, for a dense product), and bias for coefficients `c`,
    /// merged in parallel.
    pub fn merged(&self, c: &[f32]) -> (Vec<f32>, Vec<f32>) {
        self.assert_blocked();
        let (k, o) = (self.in_features, self.out_features);
        let mut w = vec![0.0f32; k * o];
        // Inputs per task: 32 make a block's share of each blocked source one whole 4 KiB page (with 8 a page
        // was read a quarter at a time by four tasks; 1.2 ms slower per merge at B/32's MLP shapes).
        const ROWS: usize = 32;
        // Each tile is merged into a small contiguous buffer, then copied out. Merged in place, its 32 rows lay
        // a row of the output apart (B/32: 12 KiB at 3072 outputs, 3 KiB at 768, so every row or every fourth
        // in the same L1 sets), and each source's pass over them missed: 6.4–7.4 against 4.0–4.9 ms a merge
        // (`cargo bench --bench cpu -- merge_fc`), whether the merge is the SIMD one or plain Rust.
        let kernel = Kernel::detect();
        w.par_chunks_mut(ROWS * o).enumerate().for_each(|(i, chunk)| {
            let ks = i * ROWS..i * ROWS + chunk.len() / o;
            let mut tile = [0.0f32; ROWS * BLOCK_ROWS];
            for r0 in (0..o).step_by(BLOCK_ROWS) {
                let cols = r0..(r0 + BLOCK_ROWS).min(o);
                merge_tiles(kernel, self, c, ks.clone(), cols.clone(), &mut tile);
                for (row, src) in chunk.chunks_exact_mut(o).zip(tile.chunks_exact(BLOCK_ROWS)) {
                    row[cols.clone()].copy_from_slice(&src[..cols.len()]);
                }
            }
        });
        let mut b = vec![0.0f32; o];
        self.merge_bias(c, 0..o, &mut b);
        (w, b)
    }
}

/// `x` is `[groups · rows_per_group, in]` (row-major), `coefficients` `[groups, T]`; returns
/// `[groups · rows_per_group, out]`.
pub fn expert_linear(
    x: &[f32],
    groups: usize,
    rows_per_group: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
) -> Result<Vec<f32>> {
    let (k, t) = (w.in_features, w.experts());
    w.ensure_experts("expert_linear")?;
    ensure!(x.len() == groups * rows_per_group * k, "expert_linear: input does not hold {groups}×{rows_per_group}×{k}");
    ensure!(coefficients.len() == groups * t, "expert_linear: coefficients are not [{groups}, {t}]");
    w.assert_blocked();
    let kernel = Kernel::detect();
    if groups == 1 && kernel == Kernel::Portable {
        return single_merge(x, rows_per_group, coefficients, w);
    }
    Ok(per_group(x, groups, rows_per_group, coefficients, w, kernel))
}

/// One group without SIMD kernels (batch routing on the portable path): the whole weight merged once, then one
/// dense product. The portable tiles are the `gemm` crate's products of 32 × 32 tiles, level with this or
/// slower (BENCHMARKS.md), and their bits would depend on where a segment's rows begin, so on the thread count.
fn single_merge(x: &[f32], rows: usize, c: &[f32], w: &ExpertLinearRef) -> Result<Vec<f32>> {
    let (k, o) = (w.in_features, w.out_features);
    let (merged, bias) = w.merged(c);
    super::gemm::linear(x, rows, k, MatRef::row_major(&merged, k, o)?, Some(&bias))
}

/// Output rows per block: the width of the micro-kernel's tile.
const BLOCK_ROWS: usize = 32;

/// Inputs per chunk: the T+1 source tiles of a chunk (`(T+1)·32·32` floats, 36 KiB for T = 8) stay in L1
/// while every group is merged from them. Measured at ViT-B/32 shapes with 8 experts: 32 to 128 inputs are
/// best; 512 to 768 are 1.4 to 1.6 times slower, with or without huge pages (so not a TLB effect). The SIMD
/// kernels merge and multiply tiles of two chunks ([`Kernel::tile_chunks`]), whose sources come from L2.
const CHUNK_INPUTS: usize = 32;

/// Groups merged per pass over a source row (16 accumulators in the AVX-512 merge).
const GROUPS_PER_PASS: usize = 8;

/// The WEMoE MLP `fc2(act(fc1(x)))`, each group's rows through its own merged weights (`x` `[groups ·
/// rows_per_group, in]`, `coefficients` `[groups, T]`): bit for bit [`expert_linear`], the activation and
/// [`expert_linear`] again. The hidden layer stays in fc1's column stripes, which are fc2's input in chunks as
/// they stand, and each stripe is activated as soon as it is whole, while it is in cache: the gather of fc1's
/// output, a pass of the activation over it in memory and fc2's packing of its input are not run
/// (BENCHMARKS.md). For one group (batch routing) as for many, but on the portable path, where one group's
/// weights are merged whole and multiplied densely (`single_merge`).
pub fn expert_mlp(
    x: &[f32],
    groups: usize,
    rows_per_group: usize,
    coefficients: &[f32],
    fc1: &ExpertLinearRef,
    fc2: &ExpertLinearRef,
    act: Activation,
) -> Result<Vec<f32>> {
    let (k, t) = (fc1.in_features, fc1.experts());
    fc1.ensure_experts("expert_mlp")?;
    ensure!(
        fc2.in_features == fc1.out_features && fc2.experts() == t,
        "expert_mlp: fc2 ({} inputs, {} experts) does not follow fc1 ({} outputs, {t} experts)",
        fc2.in_features,
        fc2.experts(),
        fc1.out_features
    );
    ensure!(x.len() == groups * rows_per_group * k, "expert_mlp: input does not hold {groups}×{rows_per_group}×{k}");
    ensure!(coefficients.len() == groups * t, "expert_mlp: coefficients are not [{groups}, {t}]");
    fc1.assert_blocked();
    fc2.assert_blocked();
    if groups * rows_per_group == 0 {
        return Ok(Vec::new());
    }
    let kernel = Kernel::detect();
    if groups == 1 && kernel == Kernel::Portable {
        // As `expert_linear` does for one group on the portable path: merged whole, dense products.
        let mut hidden = single_merge(x, rows_per_group, coefficients, fc1)?;
        activation_in_place(&mut hidden, act);
        return single_merge(&hidden, rows_per_group, coefficients, fc2);
    }
    let (rows, kc) = (groups * rows_per_group, CHUNK_INPUTS.min(k));
    let packed = pack_chunks(x, rows, k, kc);
    let hidden = per_group_stripes(&packed, kc, groups, rows_per_group, coefficients, fc1, kernel, &|stripe| {
        activation_in_place_on_this_thread(stripe, act)
    });
    drop(packed);
    // The hidden stripes are fc2's input in chunks of 32 (a block of outputs is a chunk of inputs).
    const _: () = assert!(CHUNK_INPUTS == BLOCK_ROWS);
    let stripes = per_group_stripes(&hidden, BLOCK_ROWS, groups, rows_per_group, coefficients, fc2, kernel, &|_| {});
    Ok(gather_blocks(&stripes, rows, fc2.out_features))
}

#[cfg(test)]
mod tests {
    use super::test_weights::Weights;
    use super::*;
    use crate::ops::gradcheck::values;

    /// The fused MLP equals its three steps bit for bit: per-sample routing with ragged chunks and blocks and a
    /// hidden layer wider and narrower than one block of 32, a class token per sample, and batch routing, for
    /// every activation. A second layer that does not follow the first is refused.
    #[test]
    fn mlp_equals_its_layers_and_activation_bit_for_bit() {
        let t = 3;
        for (g, n, k, h, o) in [(9, 7, 37, 71, 45), (3, 5, 40, 20, 33), (4, 1, 37, 64, 45), (1, 13, 37, 71, 45)] {
            let (l1, l2) = (Weights::new(k, h, t), Weights::new(h, o, t));
            let (w1, w2) = (l1.view(), l2.view());
            let (x, c) = (values(g * n * k, 7), values(g * t, 8));
            for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
                let mut hidden = expert_linear(&x, g, n, &c, &w1).unwrap();
                activation_in_place(&mut hidden, act);
                let want = expert_linear(&hidden, g, n, &c, &w2).unwrap();
                let got = expert_mlp(&x, g, n, &c, &w1, &w2, act).unwrap();
                assert!(got == want, "{g} groups of {n} rows, {k} → {h} → {o}, {act:?}");
            }
        }
        let (l1, l2) = (Weights::new(37, 71, t), Weights::new(70, 45, t));
        let err = expert_mlp(&values(2 * 37, 1), 2, 1, &values(2 * t, 2), &l1.view(), &l2.view(), Activation::Relu);
        assert!(err.unwrap_err().to_string().contains("does not follow fc1"));
    }

    /// A layer without task vectors is refused by every entry point, with an error that names it, not a panic.
    #[test]
    fn no_experts_is_an_error() {
        let (l1, l2) = (Weights::new(37, 45, 0), Weights::new(45, 33, 0));
        let (w1, w2) = (l1.view(), l2.view());
        let x = values(2 * 37, 1);
        let errors = [
            expert_linear(&x, 2, 1, &[], &w1).map(drop),
            expert_mlp(&x, 2, 1, &[], &w1, &w2, Activation::Relu).map(drop),
            expert_linear_backward(&x, 2, 1, &[], &w1, &values(2 * 45, 2), true).map(drop),
        ];
        for (err, op) in errors.into_iter().zip(["expert_linear", "expert_mlp", "expert_linear_backward"]) {
            let err = err.unwrap_err().to_string();
            assert!(err.starts_with(op) && err.contains("no task vectors"), "{err}");
        }
    }

    /// Odd shapes: 10 groups (a pass of eight and a partial one) of 27 rows (runs of 9), 45 inputs (a chunk and
    /// a ragged one), 71 outputs (several blocks and a ragged last one), 3 experts.
    #[test]
    fn matches_merging_then_multiplying_in_f64() {
        let (g, n, k, o, t) = (10, 27, 45, 71, 3);
        let weights = Weights::new(k, o, t);
        let (base_w, base_b, tw, tb) = (&weights.base_w, &weights.base_b, &weights.tw, &weights.tb);
        let w = weights.view();
        let x = values(g * n * k, 3);
        let c = values(g * t, 4);
        let check = |y: &[f32], g: usize| {
            for gi in 0..g {
                for r in 0..n {
                    for j in 0..o {
                        let mut want = 0.0f64;
                        for kk in 0..k {
                            let mut wv = base_w[kk * o + j] as f64;
                            for ti in 0..t {
                                wv += c[gi * t + ti] as f64 * tw[ti][kk * o + j] as f64;
                            }
                            want += x[(gi * n + r) * k + kk] as f64 * wv;
                        }
                        want +=
                            base_b[j] as f64 + (0..t).map(|ti| c[gi * t + ti] as f64 * tb[ti][j] as f64).sum::<f64>();
                        let got = y[(gi * n + r) * o + j] as f64;
                        assert!((got - want).abs() < 1e-4, "group {gi} row {r} col {j}: {got} vs {want}");
                    }
                }
            }
        };
        check(&expert_linear(&x, g, n, &c, &w).unwrap(), g);
        for kernel in Kernel::all_available() {
            check(&per_group(&x, g, n, &c, &w, kernel), g);
        }
        // One group (batch routing): every row with the first group's coefficients.
        check(&expert_linear(&x[..n * k], 1, n, &c[..t], &w).unwrap(), 1);
    }
}
