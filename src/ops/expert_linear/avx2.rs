//! The AVX-512 kernels' algorithms on 8-lane registers, for x86-64 CPUs with AVX2 and FMA but no AVX-512
//! (AMD Zen 2 and 3, Intel's client cores), which would otherwise run the portable path. Sixteen ymm
//! registers hold half of what the AVX-512 kernels keep in flight, so each works on half a 32-output row at
//! a time: the micro-kernel on runs of up to 6 rows × 16 outputs, the merge on four groups per sub-pass.
use std::arch::x86_64::*;

use super::tiles::{Run, TileSpan};
use super::{ExpertLinearRef, BLOCK_ROWS};

/// Rows per micro-kernel run: 6 × 2 accumulators, two tile vectors and a broadcast (15 registers).
const MR: usize = 6;
/// Groups merged per sub-pass over half a source row: 4 × 2 accumulators, two source vectors, a broadcast.
const SUB: usize = 4;
/// Outputs per half row: two ymm registers.
const HALF: usize = BLOCK_ROWS / 2;

/// The AVX-512 `merge_tiles` (every group's tile of the span, merged), half a row at a time: the same fused
/// multiply-adds in the same order, so the same values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn merge_tiles(w: &ExpertLinearRef, c: &[f32], span: TileSpan, tiles: &mut [f32]) {
    let t = w.task_weights.len();
    let (groups, kc) = super::tiles::merge_shape(w, c, span, tiles);
    for g0 in (0..groups).step_by(SUB) {
        let count = SUB.min(groups - g0);
        // Groups past the end repeat the last; their tiles are not stored.
        let group: [usize; SUB] = std::array::from_fn(|s| g0 + s.min(count - 1));
        for i in 0..span.width {
            for half in 0..2 {
                let off = span.offset(w, i) + half * HALF;
                let b0 = _mm256_loadu_ps(w.base_weight.as_ptr().add(off));
                let b1 = _mm256_loadu_ps(w.base_weight.as_ptr().add(off + 8));
                let mut acc = [[b0, b1]; SUB];
                for (e, tw) in w.task_weights.iter().enumerate() {
                    let v0 = _mm256_loadu_ps(tw.as_ptr().add(off));
                    let v1 = _mm256_loadu_ps(tw.as_ptr().add(off + 8));
                    for (a, &g) in acc.iter_mut().zip(&group) {
                        let cv = _mm256_set1_ps(*c.get_unchecked(g * t + e));
                        a[0] = _mm256_fmadd_ps(cv, v0, a[0]);
                        a[1] = _mm256_fmadd_ps(cv, v1, a[1]);
                    }
                }
                for (s, a) in acc.iter().enumerate().take(count) {
                    let dst = tiles.as_mut_ptr().add(((g0 + s) * kc + i) * BLOCK_ROWS + half * HALF);
                    _mm256_storeu_ps(dst, a[0]);
                    _mm256_storeu_ps(dst.add(8), a[1]);
                }
            }
        }
    }
}

/// See [`ExpertLinearRef::dot_tile`], over the span: experts in passes of four (8 accumulators per half row),
/// each row of `tile` loaded once per pass and half.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_tile(w: &ExpertLinearRef, span: TileSpan, tile: &[f32], dots: &mut [f32]) {
    let t = w.task_weights.len();
    const PASS: usize = 4;
    for e0 in (0..t).step_by(PASS) {
        let count = PASS.min(t - e0);
        let mut acc = [[_mm256_setzero_ps(); 2]; PASS];
        for half in 0..2 {
            for i in 0..span.width {
                let off = span.offset(w, i) + half * HALF;
                let row = tile.as_ptr().add(i * BLOCK_ROWS + half * HALF);
                let (v0, v1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                for (s, a) in acc.iter_mut().enumerate().take(count) {
                    let tw = w.task_weights[e0 + s].as_ptr().add(off);
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(tw), v0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(tw.add(8)), v1, a[1]);
                }
            }
        }
        for (s, a) in acc.iter().enumerate().take(count) {
            dots[e0 + s] = sum_lanes(_mm256_add_ps(a[0], a[1]));
        }
    }
}

/// The sum of a register's eight lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn sum_lanes(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// See the AVX-512 `multiply_tile` (`out[r, 0..32] += Σ_{kk < width} x[r, kk] · tile[kk, 0..32]` for `n` rows
/// of `x`, input `kk` of row `i` at `x[(kk / 32)·chunk_stride + i·stride + kk % 32]`): the rows split as evenly
/// as possible into runs of at most [`MR`], each run over the two halves of the tile's 32 outputs, its products
/// in registers for the whole width.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn multiply_tile(
    x: &[f32],
    n: usize,
    stride: usize,
    chunk_stride: usize,
    width: usize,
    tile: &[f32],
    out: &mut [f32],
) {
    for (r0, rows) in super::tiles::row_runs(x, n, stride, chunk_stride, width, tile, out, MR) {
        let (xr, or) = (x.as_ptr().add(r0 * stride), out.as_mut_ptr().add(r0 * BLOCK_ROWS));
        if stride == BLOCK_ROWS {
            // The next run's inputs in each chunk (and its outputs, fetched again: harmless).
            for ci in 0..width.div_ceil(BLOCK_ROWS) {
                super::tiles::prefetch_next_run(xr.wrapping_add(ci * chunk_stride), or, rows);
            }
        }
        for half in 0..2 {
            let run = Run {
                x: xr,
                stride,
                chunk_stride,
                width,
                tile: tile.as_ptr().add(half * HALF),
                out: or.add(half * HALF),
            };
            match rows {
                1 => rows_times_half::<1>(run),
                2 => rows_times_half::<2>(run),
                3 => rows_times_half::<3>(run),
                4 => rows_times_half::<4>(run),
                5 => rows_times_half::<5>(run),
                _ => rows_times_half::<MR>(run),
            }
        }
    }
}

/// One run of [`multiply_tile`] over one half of the tile's outputs: `R` rows of `x` times 16 outputs of the
/// `[width, 32]` tile, added into `R` rows of `out`: 2·R accumulators, each tile row broadcast-multiplied by each
/// input row, a chunk of 32 inputs at a time.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_times_half<const R: usize>(run: Run) {
    let Run { x, stride, chunk_stride, width, tile, out } = run;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (ci, k0) in (0..width).step_by(BLOCK_ROWS).enumerate() {
        let xc = x.add(ci * chunk_stride);
        for kk in 0..BLOCK_ROWS.min(width - k0) {
            let t0 = _mm256_loadu_ps(tile.add((k0 + kk) * BLOCK_ROWS));
            let t1 = _mm256_loadu_ps(tile.add((k0 + kk) * BLOCK_ROWS + 8));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xc.add(i * stride + kk));
                a[0] = _mm256_fmadd_ps(xv, t0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, t1, a[1]);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let c = out.add(i * BLOCK_ROWS);
        _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), a[0]));
        _mm256_storeu_ps(c.add(8), _mm256_add_ps(_mm256_loadu_ps(c.add(8)), a[1]));
    }
}
