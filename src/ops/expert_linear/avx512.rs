//! The AVX-512 kernels of the per-sample layer: a micro-kernel of up to 12 rows × 32 outputs (24 accumulators
//! in zmm registers, the tile's row broadcast-multiplied by each input row), the merge of eight groups' tiles
//! per pass (and its variant that writes bf16 panels for `ops::bf16`), and the router-gradient contraction.
use std::arch::x86_64::*;

use super::tiles::{Run, TileSpan};
use super::{ExpertLinearRef, BLOCK_ROWS, GROUPS_PER_PASS};

const MR: usize = 12;

/// For every group `g` of the coefficients `c` `[groups, T]`: `tiles[g][i, 0..32] = W0[k0 + i, col0..] +
/// Σ_t c[g,t] τ_t[k0 + i, col0..]` for the span's inputs `k0 + i` (tiles of `kc = tiles.len() / groups / 32`
/// rows), the columns past the span's zero (the blocked layout's padding). Each source row is loaded once per
/// eight groups.
#[target_feature(enable = "avx512f")]
pub unsafe fn merge_tiles(w: &ExpertLinearRef, c: &[f32], span: TileSpan, tiles: &mut [f32]) {
    let t = w.task_weights.len();
    let (groups, kc) = super::tiles::merge_shape(w, c, span, tiles);
    for g0 in (0..groups).step_by(GROUPS_PER_PASS) {
        let count = GROUPS_PER_PASS.min(groups - g0);
        // Groups past the end repeat the last; their tiles are not stored.
        let group: [usize; GROUPS_PER_PASS] = std::array::from_fn(|s| g0 + s.min(count - 1));
        for i in 0..span.width {
            let off = span.offset(w, i);
            let b0 = _mm512_loadu_ps(w.base_weight.as_ptr().add(off));
            let b1 = _mm512_loadu_ps(w.base_weight.as_ptr().add(off + 16));
            let mut acc = [[b0, b1]; GROUPS_PER_PASS];
            for (e, tw) in w.task_weights.iter().enumerate() {
                let v0 = _mm512_loadu_ps(tw.as_ptr().add(off));
                let v1 = _mm512_loadu_ps(tw.as_ptr().add(off + 16));
                for s in 0..GROUPS_PER_PASS {
                    let cv = _mm512_set1_ps(*c.get_unchecked(group[s] * t + e));
                    acc[s][0] = _mm512_fmadd_ps(cv, v0, acc[s][0]);
                    acc[s][1] = _mm512_fmadd_ps(cv, v1, acc[s][1]);
                }
            }
            for (s, a) in acc.iter().enumerate().take(count) {
                let dst = tiles.as_mut_ptr().add(((g0 + s) * kc + i) * BLOCK_ROWS);
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(16), a[1]);
            }
        }
    }
}

/// The merge of [`merge_tiles`] for up to eight groups, written straight into each group's bf16 panel
/// (`panels`, one of `panel_len` per group, the layout of [`crate::ops::bf16::panel_len`]) instead of f32
/// tiles: inputs `k0..k0 + width` (past `width`, up to 32, zeros), outputs `col0..col0 + 32`. Two input
/// rows at a time (an input pair), four groups per sub-pass (16 accumulators); the same fused
/// multiply-adds in the same order as [`merge_tiles`], so the same f32 values are rounded.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
pub unsafe fn merge_panels_bf16(
    w: &ExpertLinearRef,
    c: &[f32],
    k0: usize,
    width: usize,
    col0: usize,
    panels: &mut [u16],
    panel_len: usize,
) {
    const SUB: usize = 4;
    let t = w.task_weights.len();
    let groups = c.len() / t;
    assert!(col0.is_multiple_of(BLOCK_ROWS) && col0 < w.out_features && k0 + width <= w.in_features);
    assert!(groups > 0 && groups <= GROUPS_PER_PASS && c.len() == groups * t && width <= BLOCK_ROWS);
    assert!(panels.len() >= groups * panel_len && (k0 / 2 + BLOCK_ROWS / 2) * BLOCK_ROWS <= panel_len / 2);
    w.assert_blocked();
    let load = |src: &[f32], i: usize, half: usize| {
        if i < width {
            _mm512_loadu_ps(src.as_ptr().add(w.offset(k0 + i, col0) + 16 * half))
        } else {
            _mm512_setzero_ps()
        }
    };
    for pair in 0..BLOCK_ROWS / 2 {
        let rows = [2 * pair, 2 * pair + 1];
        for g0 in (0..groups).step_by(SUB) {
            let count = SUB.min(groups - g0);
            let base = [
                [load(w.base_weight, rows[0], 0), load(w.base_weight, rows[0], 1)],
                [load(w.base_weight, rows[1], 0), load(w.base_weight, rows[1], 1)],
            ];
            let mut acc = [base; SUB];
            for (e, tw) in w.task_weights.iter().enumerate() {
                let v = [[load(tw, rows[0], 0), load(tw, rows[0], 1)], [load(tw, rows[1], 0), load(tw, rows[1], 1)]];
                for (s, a) in acc.iter_mut().enumerate().take(count) {
                    let cv = _mm512_set1_ps(*c.get_unchecked((g0 + s) * t + e));
                    for (ar, vr) in a.iter_mut().zip(&v) {
                        for (x, y) in ar.iter_mut().zip(vr) {
                            *x = _mm512_fmadd_ps(cv, *y, *x);
                        }
                    }
                }
            }
            for (s, a) in acc.iter().enumerate().take(count) {
                let panel = panels.as_mut_ptr().add((g0 + s) * panel_len);
                for (h, (&even, &odd)) in a[0].iter().zip(&a[1]).enumerate() {
                    let out = panel.add(h * panel_len / 2 + (k0 / 2 + pair) * BLOCK_ROWS);
                    crate::ops::bf16::store_pair(out, even, odd);
                }
            }
        }
    }
}

/// One panel of the merged weight transposed, `Mᵀ` `[out, in]` in [`crate::ops::bf16::pack_rhs`]'s layout
/// (what `dy·Mᵀ` multiplies): inputs `c0..c0 + 16` (past the last input, zeros) over every output pair, merged
/// with the fused multiply-adds of [`merge_panels_bf16`] in the same order. A block's 16 inputs × 32 outputs
/// are merged eight inputs at a time (16 accumulators) from the blocked sources, where an input's 32 outputs
/// lie side by side; each input's outputs rounded to bf16 are 16 output pairs, and the panel wants each pair's
/// 16 inputs side by side, so the 16 × 16 pairs are transposed on the way out.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
pub unsafe fn merge_transposed_panel(w: &ExpertLinearRef, c: &[f32], c0: usize, panel: &mut [u16]) {
    const INPUTS: usize = 16;
    const PASS: usize = 8;
    let (k, o, t) = (w.in_features, w.out_features, w.task_weights.len());
    let blocks = o.div_ceil(BLOCK_ROWS);
    assert!(c.len() == t && c0 < k && panel.len() == blocks * BLOCK_ROWS * INPUTS, "merge_transposed_panel");
    w.assert_blocked();
    let valid = INPUTS.min(k - c0);
    for b in 0..blocks {
        // words[i] word p: input c0 + i, outputs 32b + 2p and 32b + 2p + 1 (a pair of bf16 per 32-bit word).
        let mut words = [_mm512_setzero_si512(); INPUTS];
        for i0 in (0..valid).step_by(PASS) {
            let rows = PASS.min(valid - i0);
            let at = |src: &[f32], i: usize, half: usize| {
                src.as_ptr().add(w.offset(c0 + i0 + i, b * BLOCK_ROWS) + 16 * half)
            };
            let mut acc = [[_mm512_setzero_ps(); 2]; PASS];
            for (i, a) in acc.iter_mut().enumerate().take(rows) {
                *a = [_mm512_loadu_ps(at(w.base_weight, i, 0)), _mm512_loadu_ps(at(w.base_weight, i, 1))];
            }
            for (tw, &ct) in w.task_weights.iter().zip(c) {
                let cv = _mm512_set1_ps(ct);
                for (i, a) in acc.iter_mut().enumerate().take(rows) {
                    a[0] = _mm512_fmadd_ps(cv, _mm512_loadu_ps(at(tw, i, 0)), a[0]);
                    a[1] = _mm512_fmadd_ps(cv, _mm512_loadu_ps(at(tw, i, 1)), a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate().take(rows) {
                words[i0 + i] = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(a[1], a[0]));
            }
        }
        for (p, pair) in crate::ops::bf16::transpose_16x16(words).iter().enumerate() {
            _mm512_storeu_si512(panel.as_mut_ptr().add((b * INPUTS + p) * 2 * INPUTS).cast(), *pair);
        }
    }
}

/// See [`ExpertLinearRef::dot_tile`], over the span: experts in passes of eight (16 accumulators), each row
/// of `tile` loaded once per pass.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_tile(w: &ExpertLinearRef, span: TileSpan, tile: &[f32], dots: &mut [f32]) {
    let t = w.task_weights.len();
    const PASS: usize = 8;
    for e0 in (0..t).step_by(PASS) {
        let count = PASS.min(t - e0);
        let mut acc = [[_mm512_setzero_ps(); 2]; PASS];
        for i in 0..span.width {
            let off = span.offset(w, i);
            let v0 = _mm512_loadu_ps(tile.as_ptr().add(i * BLOCK_ROWS));
            let v1 = _mm512_loadu_ps(tile.as_ptr().add(i * BLOCK_ROWS + 16));
            for (s, a) in acc.iter_mut().enumerate().take(count) {
                let tw = w.task_weights[e0 + s].as_ptr().add(off);
                a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(tw), v0, a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(tw.add(16)), v1, a[1]);
            }
        }
        for (s, a) in acc.iter().enumerate().take(count) {
            dots[e0 + s] = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }
}

/// [`dot_tile`](super::tiles::dot_tile) for the tiles of several groups (`tiles`: one tile per group, `tile_len` apart,
/// row stride 32): `dots[g·T + t]`. Two groups per pass over the task vectors' rows, so each row of a task vector is
/// loaded once for both (16 accumulators: two groups × eight experts, each summing both halves of a row): half the
/// reads of the task vectors' tiles, which by then have left L1, and fewer loads per multiply-add than one group's.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_tiles(w: &ExpertLinearRef, span: TileSpan, tiles: &[f32], tile_len: usize, dots: &mut [f32]) {
    const GROUPS: usize = 2;
    const PASS: usize = 8;
    let t = w.task_weights.len();
    let groups = dots.len() / t;
    assert!(dots.len() == groups * t && tile_len >= span.width * BLOCK_ROWS && tiles.len() >= groups * tile_len);
    for g0 in (0..groups).step_by(GROUPS) {
        let count = GROUPS.min(groups - g0);
        // A group past the end repeats the last; its sums are not stored.
        let tile: [*const f32; GROUPS] =
            std::array::from_fn(|s| tiles.as_ptr().add((g0 + s.min(count - 1)) * tile_len));
        for e0 in (0..t).step_by(PASS) {
            let experts = PASS.min(t - e0);
            let mut acc = [[_mm512_setzero_ps(); PASS]; GROUPS];
            for i in 0..span.width {
                let off = span.offset(w, i);
                let rows =
                    tile.map(|p| [_mm512_loadu_ps(p.add(i * BLOCK_ROWS)), _mm512_loadu_ps(p.add(i * BLOCK_ROWS + 16))]);
                for e in 0..PASS {
                    if e < experts {
                        let tw = w.task_weights.get_unchecked(e0 + e).as_ptr().add(off);
                        let (lo, hi) = (_mm512_loadu_ps(tw), _mm512_loadu_ps(tw.add(16)));
                        for (a, r) in acc.iter_mut().zip(&rows) {
                            a[e] = _mm512_fmadd_ps(hi, r[1], _mm512_fmadd_ps(lo, r[0], a[e]));
                        }
                    }
                }
            }
            for (s, a) in acc.iter().enumerate().take(count) {
                for (e, v) in a.iter().enumerate().take(experts) {
                    dots[(g0 + s) * t + e0 + e] = _mm512_reduce_add_ps(*v);
                }
            }
        }
    }
}

/// See [`super::tiles::multiply_tile`] and [`super::tiles::multiply_chunks`]: input `kk` of row `i` at
/// `x[(kk / 32)·chunk_stride + i·stride + kk % 32]` (`chunk_stride` 32 for rows that run on contiguously),
/// the rows in even runs of at most [`MR`] ([`super::tiles::row_runs`]), each run's products in registers
/// for the whole width.
#[target_feature(enable = "avx512f")]
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
        let (xr, tp, or) = (x.as_ptr().add(r0 * stride), tile.as_ptr(), out.as_mut_ptr().add(r0 * BLOCK_ROWS));
        // Packed rows (stride 32): the next run's inputs and outputs follow this run's, so they are fetched
        // into L1 while this one computes.
        let pf = stride == BLOCK_ROWS;
        let run = Run { x: xr, stride, chunk_stride, width, tile: tp, out: or };
        match rows {
            1 => rows_times_tile::<1>(run, pf),
            2 => rows_times_tile::<2>(run, pf),
            3 => rows_times_tile::<3>(run, pf),
            4 => rows_times_tile::<4>(run, pf),
            5 => rows_times_tile::<5>(run, pf),
            6 => rows_times_tile::<6>(run, pf),
            7 => rows_times_tile::<7>(run, pf),
            8 => rows_times_tile::<8>(run, pf),
            9 => rows_times_tile::<9>(run, pf),
            10 => rows_times_tile::<10>(run, pf),
            11 => rows_times_tile::<11>(run, pf),
            _ => rows_times_tile::<MR>(run, pf),
        }
    }
}

/// One run of [`multiply_tile`]: `R` rows of `x` times the `[width, 32]` tile, added into `R` rows of `out`:
/// 2·R accumulators in zmm registers, the tile's row broadcast-multiplied by each input row, a chunk of 32
/// inputs at a time; with `prefetch_next`, the next run's rows (packed after these) fetched meanwhile.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times_tile<const R: usize>(run: Run, prefetch_next: bool) {
    let Run { x, stride, chunk_stride, width, tile, out } = run;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // The next run's 2·R lines of inputs (in each chunk) and of outputs, one of each per step, spread over the
    // loop rather than issued at once (a burst of 4·R prefetches outran the line fill buffers and stalled).
    let lines = if prefetch_next { 2 * R } else { 0 };
    let (next_x, next_out) =
        (x.wrapping_add(R * BLOCK_ROWS).cast::<i8>(), out.wrapping_add(R * BLOCK_ROWS).cast::<i8>());
    for (ci, k0) in (0..width).step_by(BLOCK_ROWS).enumerate() {
        let xc = x.add(ci * chunk_stride);
        let tc = tile.add(k0 * BLOCK_ROWS);
        for kk in 0..BLOCK_ROWS.min(width - k0) {
            if kk < lines {
                _mm_prefetch::<_MM_HINT_T0>(next_x.wrapping_add(ci * chunk_stride * size_of::<f32>() + kk * 64));
                if ci == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(next_out.wrapping_add(kk * 64));
                }
            }
            let t0 = _mm512_loadu_ps(tc.add(kk * BLOCK_ROWS));
            let t1 = _mm512_loadu_ps(tc.add(kk * BLOCK_ROWS + 16));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xc.add(i * stride + kk));
                a[0] = _mm512_fmadd_ps(xv, t0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, t1, a[1]);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let c = out.add(i * BLOCK_ROWS);
        _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(c), a[0]));
        _mm512_storeu_ps(c.add(16), _mm512_add_ps(_mm512_loadu_ps(c.add(16)), a[1]));
    }
}
