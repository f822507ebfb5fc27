//! The operations on one tile, each dispatched to the kernel set that runs ([`Kernel`]): the merge of
//! every group's tile from the sources, its product with a run of rows, and the contraction of a tile with the
//! task vectors' tiles (the router gradient); with the preconditions the unchecked SIMD kernels rely on.

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use super::{ExpertLinearRef, Kernel, BLOCK_ROWS};
use crate::ops::gemm::{matmul, MatRef, Threads};

/// Every group's merged tile, inputs `ks` × outputs `cols`, for the coefficients `c` `[groups, T]`, into
/// `tiles` (one `[tiles.len() / groups / 32, 32]` tile per group; columns past `cols` left as they are).
pub(super) fn merge_tiles(
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
pub(super) fn dot_tile(
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
pub(super) fn dot_tiles(
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
pub(super) struct TileSpan {
    pub(super) k0: usize,
    pub(super) width: usize,
    pub(super) col0: usize,
}

#[cfg(target_arch = "x86_64")]
impl TileSpan {
    /// Inputs `ks` × outputs `cols`; panics unless they lie in one block of `w` (the SIMD kernels read
    /// unchecked).
    #[inline]
    pub(super) fn new(w: &ExpertLinearRef, ks: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Self {
        assert!(cols.start.is_multiple_of(BLOCK_ROWS) && !cols.is_empty() && cols.len() <= BLOCK_ROWS);
        assert!(cols.end <= w.out_features && ks.end <= w.in_features);
        let span = TileSpan { k0: ks.start, width: ks.len(), col0: cols.start };
        w.assert_blocked();
        span
    }

    /// Where input `k0 + i`'s outputs of this tile start in a blocked weight.
    #[inline]
    pub(super) fn offset(&self, w: &ExpertLinearRef, i: usize) -> usize {
        w.offset(self.k0 + i, self.col0)
    }
}

/// The preconditions of the SIMD merges: coefficients `[groups, T]` and one tile of `kc` rows per group,
/// at least `span.width`. Returns `(groups, kc)`.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn merge_shape(w: &ExpertLinearRef, c: &[f32], span: TileSpan, tiles: &[f32]) -> (usize, usize) {
    let t = w.experts();
    let groups = c.len() / t;
    assert!(groups > 0 && c.len() == groups * t && tiles.len().is_multiple_of(groups * BLOCK_ROWS));
    let kc = tiles.len() / groups / BLOCK_ROWS;
    assert!(span.width <= kc);
    (groups, kc)
}

/// The preconditions of the SIMD `multiply_tile`s (`n` rows of `x`, input `kk` of row `i` at
/// `(kk / 32)·chunk_stride + i·stride + kk % 32`; a `[width, 32]` tile; `n` output rows of 32), and the `n`
/// rows split as evenly as possible into runs of at most `most`, as `(first row, rows)`: no lane computes a
/// row that is thrown away (50 tokens run as 5 × 10, not 5 × 12).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn row_runs(
    x: &[f32],
    n: usize,
    stride: usize,
    chunk_stride: usize,
    width: usize,
    tile: &[f32],
    out: &[f32],
    most: usize,
) -> impl Iterator<Item = (usize, usize)> {
    assert!(n > 0 && tile.len() >= width * BLOCK_ROWS && out.len() >= n * BLOCK_ROWS);
    assert!(width <= BLOCK_ROWS || chunk_stride >= BLOCK_ROWS, "row_runs: chunks {chunk_stride} apart overlap");
    // The last row's last input is the farthest read.
    let reach = width.checked_sub(1).map_or(0, |last| (last / BLOCK_ROWS) * chunk_stride + last % BLOCK_ROWS + 1);
    assert!(x.len() >= (n - 1) * stride + reach);
    crate::ops::rows::even_runs(n, most)
}

/// One run of rows for the SIMD micro-kernels: where its inputs are (input `kk` of row `i` at
/// `x[(kk / 32)·chunk_stride + i·stride + kk % 32]`), and its `[width, 32]` tile and its output rows, both with
/// row stride 32 (the AVX2 kernel points `tile` and `out` at one half of the 32 outputs).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Run {
    pub(super) x: *const f32,
    pub(super) stride: usize,
    pub(super) chunk_stride: usize,
    pub(super) width: usize,
    pub(super) tile: *const f32,
    pub(super) out: *mut f32,
}

/// For the AVX2 micro-kernel on packed rows (row stride 32: a chunk of 32 inputs, or a block of 32 outputs
/// of `dy`, and the outputs): the next run's inputs and outputs follow this run's `rows` (past the last run:
/// the next group's, in `per_group`'s packed chunk and part); fetched into L1 now, they are there when it
/// starts instead of stalling its first broadcasts and its final load-add-store. Measured: 10% off the
/// per-sample layer (BENCHMARKS.md). The AVX-512 kernel issues the same prefetches spread over its loop.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn prefetch_next_run(x: *const f32, out: *const f32, rows: usize) {
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

/// `out[r, 0..32] += Σ_{kk < width} x[r, kk] · tile[kk, 0..32]` for the `n` rows of `x` (row stride `stride`).
pub(super) fn multiply_tile(
    kernel: Kernel,
    x: &[f32],
    n: usize,
    stride: usize,
    width: usize,
    tile: &[f32],
    out: &mut [f32],
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX-512F was detected; the slices bound every access (checked inside).
        Kernel::Avx512 => unsafe { avx512::multiply_tile(x, n, stride, BLOCK_ROWS, width, tile, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when AVX2 and FMA were detected; the slices bound every access (checked inside).
        Kernel::Avx2 => unsafe { avx2::multiply_tile(x, n, stride, BLOCK_ROWS, width, tile, out) },
        Kernel::Portable => {
            let xv = MatRef::strided(x, n, width, stride, 1).expect("the view lies inside x");
            let tv = MatRef::row_major(tile, width, BLOCK_ROWS).expect("the tile holds width rows");
            matmul(xv, tv, out, true, Threads::Single).expect("shapes agree");
        }
    }
}

/// [`multiply_tile`] for inputs packed in chunks of 32 (`x`: `n` rows of 32 in each chunk, chunks
/// `chunk_stride` apart, as [`super::stripes::pack_chunks`] lays them out) and a tile of `width` inputs
/// spanning several chunks. The SIMD kernels keep each run's products in registers across the chunks, so the
/// outputs are read and written once per tile rather than once per chunk; the portable path multiplies chunk
/// by chunk.
pub(super) fn multiply_chunks(
    kernel: Kernel,
    x: &[f32],
    n: usize,
    chunk_stride: usize,
    width: usize,
    tile: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: chosen only when AVX-512F was detected; the slices bound every access (checked inside).
        Kernel::Avx512 => return unsafe { avx512::multiply_tile(x, n, BLOCK_ROWS, chunk_stride, width, tile, out) },
        // SAFETY: chosen only when AVX2 and FMA were detected; the slices bound every access (checked inside).
        Kernel::Avx2 => return unsafe { avx2::multiply_tile(x, n, BLOCK_ROWS, chunk_stride, width, tile, out) },
        Kernel::Portable => {}
    }
    for (ci, k0) in (0..width).step_by(BLOCK_ROWS).enumerate() {
        let cols = BLOCK_ROWS.min(width - k0);
        let tc = &tile[k0 * BLOCK_ROWS..(k0 + cols) * BLOCK_ROWS];
        multiply_tile(kernel, &x[ci * chunk_stride..], n, BLOCK_ROWS, cols, tc, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::expert_linear::test_weights::Weights;
    use crate::ops::expert_linear::CHUNK_INPUTS;
    use crate::ops::gradcheck::values;

    /// A tile spanning chunks of packed inputs (the last one ragged, the chunks apart by more than their rows)
    /// against the product in f64, on every kernel set: rows in runs of 5, 6, 7, 9 and 12.
    #[test]
    fn multiply_chunks_matches_the_product_in_f64() {
        for (n, width) in [(27usize, 45usize), (12, 64), (5, 96), (13, 20)] {
            let chunk_stride = n * BLOCK_ROWS + 7;
            let chunks = width.div_ceil(BLOCK_ROWS);
            let (x, tile, out0) =
                (values(chunks * chunk_stride, 1), values(width * BLOCK_ROWS, 2), values(n * BLOCK_ROWS, 3));
            let input = |r: usize, kk: usize| x[(kk / BLOCK_ROWS) * chunk_stride + r * BLOCK_ROWS + kk % BLOCK_ROWS];
            for kernel in Kernel::all_available() {
                let mut out = out0.clone();
                multiply_chunks(kernel, &x, n, chunk_stride, width, &tile, &mut out);
                for r in 0..n {
                    for j in 0..BLOCK_ROWS {
                        let want = out0[r * BLOCK_ROWS + j] as f64
                            + (0..width).map(|kk| input(r, kk) as f64 * tile[kk * BLOCK_ROWS + j] as f64).sum::<f64>();
                        let got = out[r * BLOCK_ROWS + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{} {n}×{width}: row {r} col {j}: {got} {want}",
                            kernel.name()
                        );
                    }
                }
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
}
