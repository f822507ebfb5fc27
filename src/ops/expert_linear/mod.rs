//! WEMoE's linear layer with per-group merged weights:
//! `y_g = x_g · (W0 + Σ_t c[g,t] τ_t)ᵀ + (b0 + Σ_t c[g,t] β_t)` for each group `g` of rows of `x`
//! (a sample in per-sample routing; the whole batch in batch routing).
//!
//! Formulation, chosen by measurement (BENCHMARKS.md): the weight is merged in tiles of 32 outputs × an
//! input chunk small enough that the T+1 source tiles stay in L2; each tile is merged once per group and
//! multiplied at once by a micro-kernel, so the task vectors are read from memory once per call, not once
//! per sample, and no whole per-sample weight is ever materialised. With one group (batch routing) each tile
//! is merged once, in cache, which also beat merging the whole weight and multiplying densely, except on the
//! portable path, which does the latter (`single_merge`). The merges and the micro-kernel exist for AVX-512
//! (`avx512.rs`), AVX2 with FMA (`avx2.rs`) and in plain Rust, chosen at run time (`Kernel`;
//! `WEMOE_MAX_CPU_ISA` caps it). The backward walks the same tiles: each group's merged
//! tile feeds its input gradient, and its `xᵀ·dy` exists one tile at a time, contracted with the task
//! vectors' tiles while they are in cache. [`expert_mlp`] runs the two layers of the MLP and the activation
//! between them without leaving the tiles' layout in between.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::activation::{activation_in_place, activation_in_place_on_this_thread};
use super::gemm::{matmul, MatRef, Threads};
use crate::device::Activation;

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

/// The shape of a blocked weight of `out` outputs and `inp` inputs (see [`to_blocked`]).
pub fn blocked_shape(out: usize, inp: usize) -> [usize; 3] {
    [out.div_ceil(BLOCK_ROWS), inp, BLOCK_ROWS]
}

/// The elements a blocked weight of `out` outputs and `inp` inputs holds.
fn blocked_len(out: usize, inp: usize) -> usize {
    blocked_shape(out, inp).iter().product()
}

/// PyTorch's `[out, in]` weight in the blocked layout `[⌈out/32⌉, in, 32]`: block `b` holds outputs
/// `32b..32b + 32` (zeros past `out`), input by input, so element (output `j`, input `kk`) is at
/// `((j / 32) · in + kk) · 32 + j % 32`.
///
/// Why: the per-sample merge reads a tile of 32 outputs × 32 inputs from each of the T + 1 sources. In the
/// `[in, out]` layout each of the tile's rows lies in another 4 KiB page, which the hardware prefetcher does
/// not cross, so every source row missed the cache; blocked, a block's tiles follow each other in memory.
/// Measured at ViT-B/32 shapes with 8 experts: the merge's share of the per-sample layer fell from 20% to 12%
/// (BENCHMARKS.md).
pub fn to_blocked(weight: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(weight.len(), out * inp, "to_blocked: the weight is not {out}×{inp}");
    let len = blocked_len(out, inp);
    // Tile by tile: 32 rows gathered, transposed in a local array, stored as one contiguous 4 KiB run, and
    // nothing zeroed first. Scattered element by element into a zeroed vector, the 9 weights of a B/32 WEMoE
    // linear (8 experts) took 22–23 ms against 12–13 now, most of the time `embed` spent loading a WEMoE model
    // (`prepare_expert_linear` in BENCHMARKS.md).
    let mut blocked = Vec::with_capacity(len);
    blocked.spare_capacity_mut()[..len].par_chunks_mut(inp * BLOCK_ROWS).enumerate().for_each(|(bi, block)| {
        let (j0, rows) = (bi * BLOCK_ROWS, BLOCK_ROWS.min(out - bi * BLOCK_ROWS));
        // The 32 × 32 tile of outputs × inputs, gathered row by row; rows past `out` stay zero (the padding).
        let mut tile = [0.0f32; BLOCK_ROWS * BLOCK_ROWS];
        let mut transposed = [0.0f32; BLOCK_ROWS * BLOCK_ROWS];
        for k0 in (0..inp).step_by(BLOCK_ROWS) {
            let kn = BLOCK_ROWS.min(inp - k0);
            for (jj, row) in tile.chunks_exact_mut(BLOCK_ROWS).take(rows).enumerate() {
                row[..kn].copy_from_slice(&weight[(j0 + jj) * inp + k0..][..kn]);
            }
            transpose_tile(&tile, &mut transposed);
            // Inputs k0..k0 + kn, 32 outputs each (columns past kn of the tile hold the last chunk's values and
            // land in rows not copied).
            let dst = &mut block[k0 * BLOCK_ROWS..(k0 + kn) * BLOCK_ROWS];
            dst.iter_mut().zip(&transposed).for_each(|(d, &v)| {
                d.write(v);
            });
        }
    });
    // SAFETY: each block's chunks k0 = 0, 32, … wrote its inputs 0..inp, 32 values each: all `len` elements.
    unsafe { blocked.set_len(len) };
    blocked
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
/// best; 512 to 768 are 1.4 to 1.6 times slower, with or without huge pages (so not a TLB effect).
const CHUNK_INPUTS: usize = 32;

/// Groups merged per pass over a source row (16 accumulators in the AVX-512 merge).
const GROUPS_PER_PASS: usize = 8;

/// The instruction set of the per-sample kernels (merge, micro-kernel, router-gradient contraction).
/// Ordered by width: a cap keeps the narrower of itself and what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kernel {
    /// Plain Rust for the merges and the `gemm` crate on each tile (any CPU).
    Portable,
    /// The AVX-512 algorithms on 8 lanes (x86-64 with AVX2 and FMA: AMD Zen 2 and 3, Intel client cores).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// 16-lane kernels (x86-64 with AVX-512F).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Caps the kernels' instruction set below what the CPU offers (`avx2` or `portable`), to reproduce on
/// one machine what another runs, as oneDNN's `ONEDNN_MAX_CPU_ISA` does.
pub const MAX_ISA_ENV: &str = "WEMOE_MAX_CPU_ISA";

impl Kernel {
    /// The widest this CPU runs, within [`MAX_ISA_ENV`] (read once).
    pub(crate) fn detect() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let cap = std::env::var(MAX_ISA_ENV).ok();
            let widest = Kernel::widest();
            match cap.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("") | Some("avx512") => widest,
                #[cfg(target_arch = "x86_64")]
                Some("avx2") => widest.min(Kernel::Avx2),
                #[cfg(not(target_arch = "x86_64"))]
                Some("avx2") => widest,
                Some("portable") => Kernel::Portable,
                Some(other) => {
                    eprintln!("warning: {MAX_ISA_ENV}={other} ignored (expected avx512, avx2 or portable)");
                    widest
                }
            }
        })
    }

    fn widest() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel set this CPU can run (for tests that compare them): those up to the widest.
    #[cfg(test)]
    fn all_available() -> Vec<Self> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend([Kernel::Avx2, Kernel::Avx512]);
        all.retain(|&k| k <= Kernel::widest());
        all
    }

    /// The name `describe` and `doctor` print.
    pub(crate) fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "AVX-512",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "AVX2",
            Kernel::Portable => "portable",
        }
    }
}

/// Per-group merged weights (per-sample routing): [`per_group_stripes`] of the input in chunks, gathered.
fn per_group(x: &[f32], groups: usize, n: usize, c: &[f32], w: &ExpertLinearRef, kernel: Kernel) -> Vec<f32> {
    let kc = CHUNK_INPUTS.min(w.in_features);
    // Each group's rows of each chunk, contiguous: the micro-kernel then streams them instead of touching
    // a few floats of rows `k` apart, which costs an L1 miss per row per chunk.
    let packed = pack_chunks(x, groups * n, w.in_features, kc);
    let stripes = per_group_stripes(&packed, kc, groups, n, c, w, kernel, &|_| {});
    gather_blocks(&stripes, groups * n, w.out_features)
}

/// Per-group merged weights, into the output's column stripes `[blocks, groups·n, 32]` (the last block's
/// columns past the output zero before `epilogue`). For each block of 32 outputs and each chunk of inputs:
/// every group's merged tile `[chunk, 32]` is formed from the cache-resident source tiles (each source row
/// loaded once for eight groups) and multiplied into that group's outputs, so the sources are read from
/// memory once per call. `packed` is the input in chunks of `kc` inputs, `[chunks, groups·n, kc]`
/// ([`pack_chunks`]); with `kc` = 32 the stripes returned are that layout for the next layer. `epilogue` gets
/// each stripe's rows once they are whole, while they are still in cache.
///
/// A block's rows are shared out in segments (whole groups, or rows of the one group) when there are fewer
/// than two blocks per thread, so that no thread idles (fc2 of B/32 has 24 blocks); each segment merges the
/// tiles of its own groups.
#[allow(clippy::too_many_arguments)]
fn per_group_stripes(
    packed: &[f32],
    kc: usize,
    groups: usize,
    n: usize,
    c: &[f32],
    w: &ExpertLinearRef,
    kernel: Kernel,
    epilogue: &(dyn Fn(&mut [f32]) + Sync),
) -> Vec<f32> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    assert!(
        kc > 0 && packed.len() == k.div_ceil(kc) * groups * n * kc,
        "per_group_stripes: input not in chunks of {kc}"
    );
    if groups * n == 0 {
        return Vec::new();
    }
    let chunk_len = groups * n * kc;
    let (blocks, block_len) = (o.div_ceil(BLOCK_ROWS), groups * n * BLOCK_ROWS);
    let segment_rows = segment_rows(blocks, groups, n, rayon::current_num_threads());
    let mut stripes = Vec::with_capacity(blocks * block_len);
    let spare = &mut stripes.spare_capacity_mut()[..blocks * block_len];
    spare.par_chunks_mut(block_len).enumerate().for_each(|(bi, part)| {
        part.par_chunks_mut(segment_rows * BLOCK_ROWS).enumerate().for_each(|(si, segment)| {
            let r0 = bi * BLOCK_ROWS;
            let cols = BLOCK_ROWS.min(o - r0);
            let (s0, s1) = (si * segment_rows, si * segment_rows + segment.len() / BLOCK_ROWS);
            let (g_first, g_end) = (s0 / n, s1.div_ceil(n));
            // Rows `s0..s1` of group `g` (all of it, or the segment when it lies inside one group).
            let rows_of = |g: usize| s0.max(g * n)..s1.min((g + 1) * n);
            // Each row starts as its group's merged bias; columns past the last output as zero.
            let mut bias = [0.0f32; BLOCK_ROWS];
            for g in g_first..g_end {
                w.merge_bias(&c[g * t..(g + 1) * t], r0..r0 + cols, &mut bias[..cols]);
                let rows = rows_of(g);
                for row in
                    segment[(rows.start - s0) * BLOCK_ROWS..(rows.end - s0) * BLOCK_ROWS].chunks_exact_mut(BLOCK_ROWS)
                {
                    row.iter_mut().zip(&bias).for_each(|(o, &b)| {
                        o.write(b);
                    });
                }
            }
            // SAFETY: the loop above wrote every row of the segment (its groups' rows cover `s0..s1`), all 32
            // values each; `MaybeUninit<f32>` has `f32`'s layout.
            let segment = unsafe { &mut *(segment as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            // One pass's tiles; columns past the last output stay zero.
            let mut tiles = vec![0.0f32; GROUPS_PER_PASS * kc * BLOCK_ROWS];
            let tile_len = kc * BLOCK_ROWS;
            let passes = (g_end - g_first).div_ceil(GROUPS_PER_PASS);
            for (ci, k0) in (0..k).step_by(kc).enumerate() {
                let width = kc.min(k - k0);
                let chunk = &packed[ci * chunk_len..(ci + 1) * chunk_len];
                // Merged and multiplied a pass of groups at a time, so the tiles are still in L1 when used.
                for (pass, g0) in (g_first..g_end).step_by(GROUPS_PER_PASS).enumerate() {
                    prefetch_next_tiles(kernel, w, k0 + width, r0, kc, pass, passes);
                    let count = GROUPS_PER_PASS.min(g_end - g0);
                    let tiles = &mut tiles[..count * tile_len];
                    merge_tiles(kernel, w, &c[g0 * t..(g0 + count) * t], k0..k0 + width, r0..r0 + cols, tiles);
                    for (s, tile) in tiles.chunks_exact(tile_len).enumerate() {
                        let rows = rows_of(g0 + s);
                        let xg = &chunk[rows.start * kc..rows.end * kc];
                        let out = &mut segment[(rows.start - s0) * BLOCK_ROWS..(rows.end - s0) * BLOCK_ROWS];
                        multiply_tile(kernel, xg, rows.len(), kc, width, &tile[..width * BLOCK_ROWS], out);
                    }
                }
            }
            epilogue(segment);
        });
    });
    // SAFETY: every segment of every block was written in full above (each is made initialised before use).
    unsafe { stripes.set_len(blocks * block_len) };
    stripes
}

/// Rows per segment of a block in [`per_group_stripes`]: all `groups·n` rows when there are at least two
/// blocks per thread, else whole groups (or, for one group, rows) enough for two tasks per thread.
fn segment_rows(blocks: usize, groups: usize, n: usize, threads: usize) -> usize {
    let (unit, units) = if groups > 1 { (n, groups) } else { (1, n) };
    let segments = (2 * threads).div_ceil(blocks.max(1)).clamp(1, units.max(1));
    (units.div_ceil(segments) * unit).max(1)
}

/// `[rows, width]` from the column stripes `[blocks, rows, 32]` that [`per_group_stripes`] returns.
fn gather_blocks(stripes: &[f32], rows: usize, width: usize) -> Vec<f32> {
    if rows == 0 {
        return Vec::new();
    }
    gather_stripes(&stripes.chunks_exact(rows * BLOCK_ROWS).collect::<Vec<_>>(), BLOCK_ROWS, width)
}

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

/// [`expert_linear`] with bf16 products (`ops::bf16`: `--precision bf16` on the CPU; refused unless
/// [`super::bf16::available`]). As in the f32 per-group path, every group's merged tile is formed in f32 from
/// the cache-resident source tiles, eight groups per pass over them; here each is rounded straight into that
/// group's bf16 panel of the block's 32 outputs over all inputs (48 KiB at 768 inputs, so eight stay in L2),
/// and once a pass's panels are whole, each group's rows (rounded once per call) are multiplied with its
/// panel, the accumulators in tiles for the whole reduction. Each group's weight is rounded to bf16 after
/// merging, as on the GPU.
pub fn expert_linear_bf16(x: &[f32], groups: usize, n: usize, c: &[f32], w: &ExpertLinearRef) -> Result<Vec<f32>> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    ensure!(x.len() == groups * n * k, "expert_linear_bf16: input does not hold {groups}×{n}×{k}");
    ensure!(c.len() == groups * t, "expert_linear_bf16: coefficients are not [{groups}, {t}]");
    ensure!(super::bf16::available(), "bf16 products need {}", super::bf16::unavailable_reason());
    w.assert_blocked();
    let kc = CHUNK_INPUTS;
    let rows: Vec<Vec<u16>> = x.par_chunks(n * k).map(|xg| super::bf16::pack_rows(xg, n, k)).collect();
    let panel_len = super::bf16::panel_len(k);
    let blocks: Vec<usize> = (0..o).step_by(BLOCK_ROWS).collect();
    // A pass's panels (1.5 MiB at 3072 inputs) made once per rayon job, not per block: freed and made again
    // per block, their pages were faulted in afresh each time.
    let scratch = || vec![0u16; GROUPS_PER_PASS * panel_len];
    let parts: Vec<Vec<f32>> = blocks
        .par_iter()
        .map_init(scratch, |panels, &r0| {
            let cols = BLOCK_ROWS.min(o - r0);
            let mut part = vec![0.0f32; groups * n * BLOCK_ROWS];
            let session = super::bf16::TileSession::start();
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
                    super::bf16::multiply_panel(&session, &rows[g], n, k, panel, &bias, out, BLOCK_ROWS, BLOCK_ROWS);
                }
            }
            part
        })
        .collect();
    Ok(gather_stripes(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>(), BLOCK_ROWS, o))
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
    assert!(super::bf16::available(), "bf16 panels merged without a bf16 unit");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a bf16 unit is available (asserted), and with it AVX-512 BF16 and BW; bounds are asserted inside.
    unsafe {
        avx512::merge_panels_bf16(w, c, k0, width, r0, panels, panel_len)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, c, k0, width, r0, panels, panel_len);
}

/// Part `part` of `parts` of the source tiles that follow the current ones (inputs `k0..k0 + kc` of the block
/// at `col0`; past a block's last input, the next block's first), fetched into L2 while this chunk's passes
/// run. Each tile is one 4 KiB page of a blocked weight, and the hardware prefetcher does not cross pages,
/// so without this the first pass over every chunk waited for memory on each source (measured: BENCHMARKS.md).
/// The portable path leaves it to the hardware.
fn prefetch_next_tiles(
    kernel: Kernel,
    w: &ExpertLinearRef,
    k0: usize,
    col0: usize,
    kc: usize,
    part: usize,
    parts: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let bytes = kc * BLOCK_ROWS * std::mem::size_of::<f32>();
        let (from, to) = (bytes * part / parts / 64 * 64, bytes * (part + 1) / parts);
        let off = w.offset(k0, col0);
        for src in std::iter::once(&w.base_weight).chain(&w.task_weights) {
            let start = src.as_ptr().wrapping_add(off).cast::<i8>();
            for line in (from..to).step_by(64) {
                // SAFETY: SSE is part of x86-64; a prefetch reads nothing and never faults, so addresses past
                // the weights are harmless.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(start.wrapping_add(line)) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernel, w, k0, col0, kc, part, parts);
}

/// `[rows, width]` from column stripes: stripe `i` holds columns `i·stride..(i+1)·stride` of every row, as
/// `[rows, stride]` (the last stripe's columns past `width` are padding). Gathered in parallel, 16 rows at a
/// time, so that the rows being written stay in cache and each stripe is read in runs of 16 rows (one thread
/// copying stripe by stripe wrote 128 bytes at a time, a row apart; BENCHMARKS.md).
fn gather_stripes(stripes: &[&[f32]], stride: usize, width: usize) -> Vec<f32> {
    const GATHER_ROWS: usize = 16;
    let rows = stripes.first().map_or(0, |s| s.len() / stride);
    assert!(
        stripes.len() == width.div_ceil(stride) && stripes.iter().all(|s| s.len() == rows * stride),
        "gather_stripes: {} stripes of {stride} do not make {rows} rows of {width}",
        stripes.len()
    );
    // Written once by the copies, not zeroed first.
    let mut y = Vec::with_capacity(rows * width);
    y.spare_capacity_mut()[..rows * width].par_chunks_mut(GATHER_ROWS * width).enumerate().for_each(|(i, dst)| {
        let first = i * GATHER_ROWS * stride;
        for (si, stripe) in stripes.iter().enumerate() {
            let (c0, cols) = (si * stride, stride.min(width - si * stride));
            for (d, src) in dst.chunks_exact_mut(width).zip(stripe[first..].chunks_exact(stride)) {
                write_values(&mut d[c0..c0 + cols], &src[..cols]);
            }
        }
    });
    // SAFETY: the stripes (asserted: ⌈width/stride⌉ of them, each of `rows` rows) cover columns 0..width of
    // every row, and each was copied in above.
    unsafe { y.set_len(rows * width) };
    y
}

/// Every group's merged tile, inputs `ks` × outputs `cols`, for the coefficients `c` `[groups, T]`, into
/// `tiles` (one `[tiles.len() / groups / 32, 32]` tile per group; columns past `cols` left as they are).
fn merge_tiles(
    kernel: Kernel,
    w: &ExpertLinearRef,
    c: &[f32],
    ks: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    tiles: &mut [f32],
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX-512F was detected; the span was checked and the rest is checked inside.
        Kernel::Avx512 => unsafe { avx512::merge_tiles(w, c, TileSpan::new(w, ks, cols), tiles) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX2 and FMA were detected; the span was checked and the rest is checked
        // inside.
        Kernel::Avx2 => unsafe { avx2::merge_tiles(w, c, TileSpan::new(w, ks, cols), tiles) },
        Kernel::Portable => {
            let t = w.experts();
            let tile_len = tiles.len() / (c.len() / t);
            for (cg, tile) in c.chunks_exact(t).zip(tiles.chunks_exact_mut(tile_len)) {
                w.merge_tile(cg, ks.clone(), cols.clone(), tile, BLOCK_ROWS);
            }
        }
    }
}

/// [`ExpertLinearRef::dot_tile`] on the kernel set's lanes.
fn dot_tile(
    kernel: Kernel,
    w: &ExpertLinearRef,
    ks: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    tile: &[f32],
    dots: &mut [f32],
) {
    assert!(tile.len() >= ks.len() * BLOCK_ROWS && dots.len() == w.experts(), "dot_tile: tile or dots too short");
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX-512F was detected; the span and the slices were checked.
        Kernel::Avx512 => unsafe { avx512::dot_tile(w, TileSpan::new(w, ks, cols), tile, dots) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX2 and FMA were detected; the span and the slices were checked.
        Kernel::Avx2 => unsafe { avx2::dot_tile(w, TileSpan::new(w, ks, cols), tile, dots) },
        Kernel::Portable => w.dot_tile(ks, cols, tile, dots),
    }
}

/// [`dot_tile`] for each of `groups` tiles (`tiles`: one per group, `tiles.len() / groups` apart), into
/// `dots` `[groups, T]`: with AVX-512 several groups per pass over the task vectors' tiles.
fn dot_tiles(
    kernel: Kernel,
    w: &ExpertLinearRef,
    ks: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    tiles: &[f32],
    dots: &mut [f32],
) {
    let t = w.experts();
    if t == 0 {
        return; // no task vector, nothing to contract
    }
    let groups = dots.len() / t;
    assert!(groups > 0 && dots.len() == groups * t, "dot_tiles: dots are not [groups, T]");
    let tile_len = tiles.len() / groups;
    assert!(tile_len >= ks.len() * BLOCK_ROWS, "dot_tiles: tiles too short");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        // SAFETY: chosen only when AVX-512F was detected; the span and the slices were checked.
        return unsafe { avx512::dot_tiles(w, TileSpan::new(w, ks, cols), tiles, tile_len, dots) };
    }
    for (tile, d) in tiles.chunks_exact(tile_len).zip(dots.chunks_exact_mut(t)) {
        dot_tile(kernel, w, ks.clone(), cols.clone(), tile, d);
    }
}

/// A tile's place in a blocked weight: inputs `k0..k0 + width` of the block of 32 outputs from `col0` (the
/// SIMD kernels read all 32; past the last output the blocked layout holds zeros).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
struct TileSpan {
    k0: usize,
    width: usize,
    col0: usize,
}

#[cfg(target_arch = "x86_64")]
impl TileSpan {
    /// Inputs `ks` × outputs `cols`; panics unless they lie in one block of `w` (the SIMD kernels read
    /// unchecked).
    #[inline]
    fn new(w: &ExpertLinearRef, ks: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Self {
        assert!(cols.start.is_multiple_of(BLOCK_ROWS) && !cols.is_empty() && cols.len() <= BLOCK_ROWS);
        assert!(cols.end <= w.out_features && ks.end <= w.in_features);
        let span = TileSpan { k0: ks.start, width: ks.len(), col0: cols.start };
        w.assert_blocked();
        span
    }

    /// Where input `k0 + i`'s outputs of this tile start in a blocked weight.
    #[inline]
    fn offset(&self, w: &ExpertLinearRef, i: usize) -> usize {
        w.offset(self.k0 + i, self.col0)
    }
}

/// The preconditions of the SIMD merges: coefficients `[groups, T]` and one tile of `kc` rows per group,
/// at least `span.width`. Returns `(groups, kc)`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn merge_shape(w: &ExpertLinearRef, c: &[f32], span: TileSpan, tiles: &[f32]) -> (usize, usize) {
    let t = w.experts();
    let groups = c.len() / t;
    assert!(groups > 0 && c.len() == groups * t && tiles.len().is_multiple_of(groups * BLOCK_ROWS));
    let kc = tiles.len() / groups / BLOCK_ROWS;
    assert!(span.width <= kc);
    (groups, kc)
}

/// The preconditions of the SIMD `multiply_tile`s (`n` rows of `x` at stride `stride`, a `[width, 32]` tile,
/// `n` output rows of 32), and the `n` rows split as evenly as possible into runs of at most `most`, as
/// `(first row, rows)`: no lane computes a row that is thrown away (50 tokens run as 5 × 10, not 5 × 12).
#[cfg(target_arch = "x86_64")]
#[inline]
fn row_runs(
    x: &[f32],
    n: usize,
    stride: usize,
    width: usize,
    tile: &[f32],
    out: &[f32],
    most: usize,
) -> impl Iterator<Item = (usize, usize)> {
    assert!(n > 0 && width <= stride && x.len() >= (n - 1) * stride + width && tile.len() >= width * BLOCK_ROWS);
    assert!(out.len() >= n * BLOCK_ROWS);
    super::rows::even_runs(n, most)
}

/// For the AVX2 micro-kernel on packed rows (row stride 32: a chunk of 32 inputs, or a block of 32 outputs
/// of `dy`, and the outputs): the next run's inputs and outputs follow this run's `rows` (past the last run:
/// the next group's, in `per_group`'s packed chunk and part); fetched into L1 now, they are there when it
/// starts instead of stalling its first broadcasts and its final load-add-store. Measured: 10% off the
/// per-sample layer (BENCHMARKS.md). The AVX-512 kernel issues the same prefetches spread over its loop.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_next_run(x: *const f32, out: *const f32, rows: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let next = rows * BLOCK_ROWS * std::mem::size_of::<f32>();
    let (xn, on) = (x.cast::<i8>().wrapping_add(next), out.cast::<i8>().wrapping_add(next));
    for line in (0..next).step_by(64) {
        // SAFETY: SSE is part of x86-64; a prefetch never faults, so addresses past the slices are harmless.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(xn.wrapping_add(line));
            _mm_prefetch::<_MM_HINT_T0>(on.wrapping_add(line));
        }
    }
}

/// A 32 × 32 tile transposed. Fixed sizes let the compiler drop the bounds checks and unroll.
fn transpose_tile(tile: &[f32; BLOCK_ROWS * BLOCK_ROWS], out: &mut [f32; BLOCK_ROWS * BLOCK_ROWS]) {
    for (j, row) in out.chunks_exact_mut(BLOCK_ROWS).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = tile[i * BLOCK_ROWS + j];
        }
    }
}

/// Copies `src` into the uninitialised `dst` of the same length (`write_copy_of_slice` is newer than the MSRV).
#[inline]
fn write_values(dst: &mut [std::mem::MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.iter_mut().zip(src).for_each(|(d, &v)| {
        d.write(v);
    });
}

/// `x` `[rows, k]` rearranged as `[chunks, rows, kc]`: chunk `i` holds columns `i·kc..(i+1)·kc` of every
/// row, the last chunk zero-padded.
fn pack_chunks(x: &[f32], rows: usize, k: usize, kc: usize) -> Vec<f32> {
    let (chunks, len) = (k.div_ceil(kc), k.div_ceil(kc) * rows * kc);
    assert_eq!(x.len(), rows * k, "pack_chunks: the input does not hold {rows}×{k}");
    // Written once, padding included, not zeroed first (a pass over memory of its own).
    let mut packed = Vec::with_capacity(len);
    packed.spare_capacity_mut()[..len].par_chunks_mut(rows * kc).enumerate().for_each(|(ci, chunk)| {
        let k0 = ci * kc;
        let width = kc.min(k - k0);
        for (dst, src) in chunk.chunks_exact_mut(kc).zip(x.chunks_exact(k)) {
            write_values(&mut dst[..width], &src[k0..k0 + width]);
            dst[width..].iter_mut().for_each(|v| {
                v.write(0.0);
            });
        }
    });
    // SAFETY: each of the `chunks` chunks holds `rows` rows of `kc` (x has `rows` rows, asserted), and every
    // row's `kc` values were written above.
    debug_assert_eq!(chunks * rows * kc, len);
    unsafe { packed.set_len(len) };
    packed
}

/// `out[r, 0..32] += Σ_{kk < width} x[r, kk] · tile[kk, 0..32]` for the `n` rows of `x` (row stride `stride`).
fn multiply_tile(kernel: Kernel, x: &[f32], n: usize, stride: usize, width: usize, tile: &[f32], out: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX-512F was detected; the slices bound every access (checked inside).
        Kernel::Avx512 => unsafe { avx512::multiply_tile(x, n, stride, width, tile, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX2 and FMA were detected; the slices bound every access (checked inside).
        Kernel::Avx2 => unsafe { avx2::multiply_tile(x, n, stride, width, tile, out) },
        Kernel::Portable => {
            let xv = MatRef::strided(x, n, width, stride, 1).expect("the view lies inside x");
            let tv = MatRef::row_major(tile, width, BLOCK_ROWS).expect("the tile holds width rows");
            matmul(xv, tv, out, true, Threads::Single).expect("shapes agree");
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod backward_bf16;
pub use backward_bf16::expert_linear_backward_bf16;

/// Backward of [`expert_linear`]: `(dx, dc)` for the output gradient `dy` `[groups · n, out]`:
/// `dx_g = dy_g · W_gᵀ` and the router gradient `dc[g, t] = <τ_t, x_gᵀ·dy_g> + <β_t, Σ_rows dy_g>`. `dx` only
/// when `input_gradient`: without it neither its product nor the merge that feeds it runs (the first WEMoE
/// layer's input depends on no router; `cargo bench --bench cpu -- backward_fc1` times both).
/// Both are contracted tile by tile (`per_group_backward`), so neither a group's merged weight nor its
/// `x_gᵀ·dy_g` is ever formed whole; for one group (batch routing) too, where forming them would read the
/// T + 1 sources and write two full matrices per call, then read the product once per task vector
/// (measured: one batch-routing adaptation step, loading included, about 8% faster this way; BENCHMARKS.md).
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

/// The shapes a backward of [`expert_linear`] takes, checked (`op` names the caller in the error).
fn check_backward(
    op: &str,
    x: &[f32],
    groups: usize,
    n: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
    dy: &[f32],
) -> Result<()> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    ensure!(x.len() == groups * n * k, "{op}: input does not hold {groups}×{n}×{k}");
    ensure!(dy.len() == groups * n * o, "{op}: gradient does not hold {groups}×{n}×{o}");
    ensure!(coefficients.len() == groups * t, "{op}: coefficients are not [{groups}, {t}]");
    w.assert_blocked();
    Ok(())
}

/// Sums over the rows of `[rows, o]` in f64.
fn column_sums(x: &[f32], o: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; o];
    for row in x.chunks_exact(o) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    sums
}

/// `<β_t, Σ_rows dy>`: a task's bias delta against the column sums of `dy`, in f64.
fn bias_dot(bias: &[f32], colsum: &[f64]) -> f64 {
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
fn combine_chunks(
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
    use crate::ops::gradcheck::values;

    /// Test weights `[in, out]` (element (output j, input kk) at kk·o + j): base, biases, T task vectors; and
    /// the weights blocked, for the view the kernels read.
    struct Weights {
        base_w: Vec<f32>,
        base_b: Vec<f32>,
        tw: Vec<Vec<f32>>,
        tb: Vec<Vec<f32>>,
        blocked: Vec<Vec<f32>>,
        k: usize,
        o: usize,
    }

    impl Weights {
        fn new(k: usize, o: usize, t: usize) -> Self {
            let base_w = values(k * o, 1);
            let tw: Vec<Vec<f32>> = (0..t).map(|i| values(k * o, 10 + i)).collect();
            let blocked = std::iter::once(&base_w)
                .chain(&tw)
                .map(|w| to_blocked(&crate::ops::transpose::transpose(w, k, o), o, k))
                .collect();
            Weights { base_w, base_b: values(o, 2), tw, tb: (0..t).map(|i| values(o, 20 + i)).collect(), blocked, k, o }
        }

        fn view(&self) -> ExpertLinearRef<'_> {
            ExpertLinearRef {
                base_weight: &self.blocked[0],
                base_bias: &self.base_b,
                task_weights: self.blocked[1..].iter().map(Vec::as_slice).collect(),
                task_biases: self.tb.iter().map(Vec::as_slice).collect(),
                out_features: self.o,
                in_features: self.k,
            }
        }
    }

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

    /// The blocked layout puts (output j, input kk) where its doc says, zeros past the last output (a ragged
    /// block of outputs, a ragged tile of inputs).
    #[test]
    fn to_blocked_places_each_element_and_pads_with_zeros() {
        let (o, k) = (37, 45);
        let w: Vec<f32> = (0..o * k).map(|i| i as f32 + 1.0).collect();
        let b = to_blocked(&w, o, k);
        assert_eq!(b.len(), 2 * k * 32);
        for j in 0..64 {
            for kk in 0..k {
                let want = if j < o { w[j * k + kk] } else { 0.0 };
                assert_eq!(b[((j / 32) * k + kk) * 32 + j % 32], want, "output {j} input {kk}");
            }
        }
    }

    /// Several groups' contractions at once equal each group's own: odd group and expert counts (a partial pass
    /// of each), a ragged chunk of inputs and a partial block of outputs.
    #[test]
    fn dot_tiles_equal_each_groups_dot_tile() {
        let (k, o, t, groups) = (45, 71, 11, 5);
        let w = Weights::new(k, o, t);
        let view = w.view();
        let (ks, cols, tile_len) = (32..45, 64..71, CHUNK_INPUTS * BLOCK_ROWS);
        let tiles = values(groups * tile_len, 7);
        for kernel in Kernel::all_available() {
            let mut all = vec![0.0f32; groups * t];
            dot_tiles(kernel, &view, ks.clone(), cols.clone(), &tiles, &mut all);
            for (g, got) in all.chunks_exact(t).enumerate() {
                let mut want = vec![0.0f32; t];
                dot_tile(kernel, &view, ks.clone(), cols.clone(), &tiles[g * tile_len..], &mut want);
                for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{} group {g} expert {e}: {a} {b}",
                        kernel.name()
                    );
                }
            }
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

    /// A block's rows are shared out in segments when there are fewer than two blocks per thread; every row is
    /// still computed as without them. Pools of 1, 3 and 16 threads give the same bits, for one group (split at
    /// rows) and for many (split at groups, 11 of them), and the split itself covers the rows as documented.
    #[test]
    fn segments_leave_every_row_the_same_bits() {
        assert_eq!(segment_rows(96, 1, 3200, 2), 3200, "enough blocks: one segment");
        assert_eq!(segment_rows(24, 1, 3200, 16), 1600, "two segments for 32 tasks on 24 blocks");
        assert_eq!(segment_rows(2, 11, 5, 3), 20, "whole groups: 4 of 11 per segment");
        assert_eq!(segment_rows(1, 1, 3, 64), 1, "never more segments than rows");
        let (k, o, t) = (45, 71, 3);
        let weights = Weights::new(k, o, t);
        let w = weights.view();
        for (g, n) in [(1, 301), (11, 5)] {
            let (x, c) = (values(g * n * k, 3), values(g * t, 4));
            let on = |threads: usize, kernel: Option<Kernel>| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| match kernel {
                    Some(kernel) => per_group(&x, g, n, &c, &w, kernel),
                    None => expert_linear(&x, g, n, &c, &w).unwrap(),
                })
            };
            // Each kernel on the tiles, and what `expert_linear` runs (one group on the portable path: dense).
            let kernels = Kernel::all_available().into_iter().filter(|&kn| g > 1 || kn != Kernel::Portable);
            for kernel in kernels.map(Some).chain([None]) {
                let one = on(1, kernel);
                for threads in [3, 16] {
                    assert!(on(threads, kernel) == one, "{g} groups of {n} rows, {kernel:?}, on {threads} threads");
                }
            }
        }
    }

    /// The bf16 per-group path against the f64 sum of the rounded operands' products: each group's
    /// weight merged in f32 as the kernel merges it, then rounded; 10 groups (two merge passes) of 27 rows, 45
    /// inputs, 71 outputs (ragged chunks, blocks and row tiles), 3 experts. What is left is f32 accumulation.
    #[test]
    fn bf16_path_equals_the_rounded_operands_products() {
        if !crate::ops::bf16::available() {
            return; // the CPU backend refuses bf16 here (tests/wemoe_fusionbench.rs checks the refusal)
        }
        let (g, n, k, o, t) = (10, 27, 45, 71, 3);
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

    /// The tiled per-group backward (both kernels) and the one-group path against the products in f64, on
    /// shapes that leave ragged chunks, blocks and merge passes: 10 groups of 5 rows, 37 inputs, 71 outputs,
    /// 3 experts. Without the input gradient, no `dx` and the same `dc`, bit for bit.
    #[test]
    fn backward_paths_match_the_products_in_f64() {
        let (g, n, k, o, t) = (10, 5, 37, 71, 3);
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
