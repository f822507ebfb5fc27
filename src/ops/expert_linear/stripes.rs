//! The forward on the tiles: for each block of 32 outputs and each chunk of inputs, every group's merged tile
//! is formed from the cache-resident source tiles and multiplied into that group's rows, the outputs kept as
//! column stripes `[blocks, rows, 32]`; with the packing of the input into chunks and the gather of the stripes
//! into rows.

use rayon::prelude::*;

use super::tiles::{merge_tiles, multiply_chunks, multiply_tile};
use super::{ExpertLinearRef, Kernel, BLOCK_ROWS, CHUNK_INPUTS, GROUPS_PER_PASS};

/// Per-group merged weights (per-sample routing): [`per_group_stripes`] of the input in chunks, gathered.
pub(super) fn per_group(
    x: &[f32],
    groups: usize,
    n: usize,
    c: &[f32],
    w: &ExpertLinearRef,
    kernel: Kernel,
) -> Vec<f32> {
    let kc = CHUNK_INPUTS.min(w.in_features);
    // Each group's rows of each chunk, contiguous: the micro-kernel then streams them instead of touching
    // a few floats of rows `k` apart, which costs an L1 miss per row per chunk.
    let packed = pack_chunks(x, groups * n, w.in_features, kc);
    let stripes = per_group_stripes(&packed, kc, groups, n, c, w, kernel, &|_| {});
    gather_blocks(&stripes, groups * n, w.out_features)
}

/// Per-group merged weights, into the output's column stripes `[blocks, groups·n, 32]` (the last block's columns past
/// the output zero before `epilogue`). For each block of 32 outputs and each span of inputs (a chunk, or with the SIMD
/// kernels two: [`Kernel::tile_chunks`]): every group's merged tile `[span, 32]` is formed from the cache-resident
/// source tiles (each source row loaded once for eight groups) and multiplied into that group's outputs, so the sources
/// are read from memory once per call. `packed` is the input in chunks of `kc` inputs, `[chunks, groups·n, kc]`
/// ([`pack_chunks`]); with `kc` = 32 the stripes returned are that layout for the next layer. `epilogue` gets each
/// stripe's rows once they are whole, while they are still in cache.
///
/// A block's rows are shared out in segments (whole groups, or rows of the one group) when there are fewer
/// than two blocks per thread, so that no thread idles (fc2 of B/32 has 24 blocks); each segment merges the
/// tiles of its own groups.
#[allow(clippy::too_many_arguments)]
pub(super) fn per_group_stripes(
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
            // A tile spans `depth` chunks, as many as the kernel keeps in registers, when the input is in chunks
            // of 32 (the layout `multiply_chunks` reads); the same for every segment, so that a row's bits do
            // not depend on the thread count.
            let depth = if kc == BLOCK_ROWS { kernel.tile_chunks() } else { 1 };
            // One pass's tiles; columns past the last output stay zero.
            let tile_len = depth * kc * BLOCK_ROWS;
            let mut tiles = vec![0.0f32; GROUPS_PER_PASS.min(g_end - g_first) * tile_len];
            let passes = (g_end - g_first).div_ceil(GROUPS_PER_PASS);
            for k0 in (0..k).step_by(depth * kc) {
                let width = (depth * kc).min(k - k0);
                // This tile's chunks, from the first on.
                let chunks = &packed[k0 / kc * chunk_len..];
                // Merged and multiplied a pass of groups at a time, so the tiles are still in cache when used.
                for (pass, g0) in (g_first..g_end).step_by(GROUPS_PER_PASS).enumerate() {
                    prefetch_next_tiles(kernel, w, k0 + width, r0, depth * kc, pass, passes);
                    let count = GROUPS_PER_PASS.min(g_end - g0);
                    let tiles = &mut tiles[..count * tile_len];
                    merge_tiles(kernel, w, &c[g0 * t..(g0 + count) * t], k0..k0 + width, r0..r0 + cols, tiles);
                    for (s, tile) in tiles.chunks_exact(tile_len).enumerate() {
                        let rows = rows_of(g0 + s);
                        let xg = &chunks[rows.start * kc..];
                        let out = &mut segment[(rows.start - s0) * BLOCK_ROWS..(rows.end - s0) * BLOCK_ROWS];
                        let tile = &tile[..width * BLOCK_ROWS];
                        if depth == 1 {
                            multiply_tile(kernel, &xg[..rows.len() * kc], rows.len(), kc, width, tile, out);
                        } else {
                            multiply_chunks(kernel, xg, rows.len(), chunk_len, width, tile, out);
                        }
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
pub(super) fn gather_blocks(stripes: &[f32], rows: usize, width: usize) -> Vec<f32> {
    if rows == 0 {
        return Vec::new();
    }
    gather_stripes(&stripes.chunks_exact(rows * BLOCK_ROWS).collect::<Vec<_>>(), BLOCK_ROWS, width)
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
pub(super) fn gather_stripes(stripes: &[&[f32]], stride: usize, width: usize) -> Vec<f32> {
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
pub(super) fn pack_chunks(x: &[f32], rows: usize, k: usize, kc: usize) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::expert_linear::expert_linear;
    use crate::ops::expert_linear::test_weights::Weights;
    use crate::ops::gradcheck::values;

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

    /// The AVX2 kernels are the AVX-512 ones' algorithms on eight lanes, the same fused multiply-adds in the
    /// same order, so the layer gives the same bits on either (BENCHMARKS.md compares whole forwards): one group
    /// and eleven, over a ragged second chunk, on tiles of two chunks and of one. Checked where the CPU has
    /// AVX-512 (both sets then run); elsewhere there is nothing to compare, and the test says so.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_avx512_give_the_same_bits() {
        let available = Kernel::all_available();
        if !available.contains(&Kernel::Avx512) {
            eprintln!("avx2_and_avx512_give_the_same_bits: no AVX-512 on this CPU, nothing to compare");
            return;
        }
        let (o, t) = (71, 3);
        for k in [45, 20] {
            let weights = Weights::new(k, o, t);
            let w = weights.view();
            for (g, n) in [(1, 301), (11, 5)] {
                let (x, c) = (values(g * n * k, 5), values(g * t, 6));
                let on = |kernel| per_group(&x, g, n, &c, &w, kernel);
                assert!(on(Kernel::Avx2) == on(Kernel::Avx512), "{g} groups of {n} rows, {k} inputs");
            }
        }
    }
}
