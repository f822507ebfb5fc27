//! Attention and its backward on AVX-512 when the head width is a multiple of 64 (every CLIP encoder's is
//! 64). The `gemm` crate ran a B/32 head's 50 × 64 · 64 × 50 products at about a quarter of the machine's rate
//! (its packing and dispatch outweigh so little work). Here every product is one kernel, [`product`]: six
//! rows × 64 columns in 24 accumulators, each term loading four vectors of a row of the right-hand side and
//! broadcasting one value per row. For the scores that right-hand side is the keys, transposed once for all of
//! a sequence's heads; for the output, the values as they are. The softmax between them is compiled for AVX-512
//! as well. The backward's five products per head are the same kernel, over the values transposed once a
//! sequence and the probabilities and their gradient transposed once a head.
use std::arch::x86_64::*;

use super::{softmax_rows, Span};
use crate::ops::rows::even_runs;

/// Query rows per pass: 6 × 4 accumulators and the 4 loaded vectors keep 28 of the 32 registers busy.
const MAX_ROWS: usize = 6;

/// Keys per pass of the scores, and head dimensions per pass of the output: four vectors of 16.
pub const COLS: usize = 64;

/// Scratch for [`head`]: the transposed keys `[width, keys rounded up to 64]` (the padding stays zero) and
/// the scores `[queries, keys rounded up to 64]`.
pub struct Scratch {
    keys_t: Vec<f32>,
    scores: Vec<f32>,
    padded: usize,
}

impl Scratch {
    /// Buffers for `span`'s shape, holding `k` `[keys, width]` transposed: every head's at once, reading `k`
    /// in order (transposed head by head, each key's 64 values a strided load that missed the cache, it was
    /// a third of the heads' time).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and `span.width` be a multiple of 16 (checked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn new(k: &[f32], span: Span) -> Self {
        let (keys, width) = (span.keys, span.width);
        let padded = keys.div_ceil(COLS) * COLS;
        let mut keys_t = vec![0.0; width * padded];
        transpose(k, keys, width, width, &mut keys_t, padded);
        Scratch { keys_t, scores: vec![0.0; span.queries * padded], padded }
    }
}

/// `dst[c · dst_stride + r] = src[r · src_stride + c]` for `rows` rows and `cols` columns of `src`, and zero for
/// the rows from `rows` to the next multiple of 16, in blocks of 16 × 16 transposed in registers.
///
/// # Safety
/// The CPU must have AVX-512F; `cols` must be a multiple of 16 (both checked, as are the slices' lengths).
#[target_feature(enable = "avx512f")]
unsafe fn transpose(src: &[f32], rows: usize, cols: usize, src_stride: usize, dst: &mut [f32], dst_stride: usize) {
    assert!(cols.is_multiple_of(16) && cols <= src_stride && rows.div_ceil(16) * 16 <= dst_stride);
    assert!(rows == 0 || src.len() >= (rows - 1) * src_stride + cols);
    assert!(cols == 0 || dst.len() >= (cols - 1) * dst_stride + rows.div_ceil(16) * 16);
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..cols).step_by(16) {
            // Rows past the last load zeros: the padding a product's last pass multiplies.
            let mut block = [_mm512_setzero_ps(); 16];
            for (r, row) in block.iter_mut().enumerate().take(rows - r0) {
                *row = _mm512_loadu_ps(src.as_ptr().add((r0 + r) * src_stride + c0));
            }
            for (c, column) in transpose_16x16(block).iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add((c0 + c) * dst_stride + r0), *column);
            }
        }
    }
}

/// The 16 × 16 block whose rows are `rows`, transposed: element `c` of row `r` becomes element `r` of row
/// `c`. Pairs of rows interleaved by 32-bit lanes, then by 64-bit lanes, then their 128-bit quarters
/// gathered twice.
#[target_feature(enable = "avx512f")]
fn transpose_16x16(rows: [__m512; 16]) -> [__m512; 16] {
    let r = rows;
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Within each group of four: lows and highs of pairs (0, 2) and (1, 3) by 64-bit lanes.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, m) = (i / 4 * 4, i % 4);
        let (a, b) = (_mm512_castps_pd(t[g + m / 2]), _mm512_castps_pd(t[g + m / 2 + 2]));
        _mm512_castpd_ps(if m % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
    });
    // Quarters 0 and 2 (then 1 and 3) of rows i and i + 4, within each half of the block.
    let w: [__m512; 16] = std::array::from_fn(|i| {
        let (h, m) = (i / 8 * 8, i % 8);
        let (a, b) = (u[h + m % 4], u[h + m % 4 + 4]);
        if m < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    // The same between the halves.
    std::array::from_fn(|i| {
        let (a, b) = (w[i % 8], w[i % 8 + 8]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    })
}

/// Head `h` of [`super::attend`]: `out[:, h·hd..(h + 1)·hd] = softmax(q_h k_hᵀ · scale) v_h`, with `q` `[queries,
/// width]`, `k` in `scratch`, `v` `[keys, width]`, `out` `[queries, width]` (what `attend` checked), under the
/// span's mask.
///
/// # Safety
/// The CPU must have AVX-512F; `hd = span.width / span.heads` must be a multiple of [`COLS`], `h < span.heads`,
/// and `scratch` made for `span` (all checked here).
#[target_feature(enable = "avx512f")]
pub unsafe fn head(q: &[f32], v: &[f32], span: Span, h: usize, scratch: &mut Scratch, out: &mut [f32]) {
    let Span { queries, keys, width, heads, causal } = span;
    let hd = width / heads;
    let padded = scratch.padded;
    assert!(hd.is_multiple_of(COLS) && h < heads && padded >= keys && padded.is_multiple_of(COLS));
    assert!(scratch.keys_t.len() == width * padded && scratch.scores.len() == queries * padded);
    assert!(q.len() >= queries * width && v.len() >= keys * width && out.len() >= queries * width);
    let at = h * hd;
    let scale = (hd as f32).powf(-0.5);
    // The keys row i sees: all, or under the causal mask up to its own token.
    let offset = keys - queries;
    let seen = |i: usize| if causal { offset + i + 1 } else { keys };
    let (q_h, keys_t) = (Strided { at: q.as_ptr().add(at), stride: width }, scratch.keys_t.as_ptr().add(at * padded));
    let scores = Strided { at: scratch.scores.as_mut_ptr(), stride: padded };
    product(q_h, queries, |_| hd, Strided { at: keys_t, stride: padded }, padded, scores);
    for (i, row) in scratch.scores.chunks_exact_mut(padded).enumerate() {
        let seen = seen(i);
        softmax_rows(&mut row[..seen], seen, scale);
        row[seen..keys].fill(0.0);
    }
    let probs = Strided { at: scratch.scores.as_ptr(), stride: padded };
    let (v_h, out_h) =
        (Strided { at: v.as_ptr().add(at), stride: width }, Strided { at: out.as_mut_ptr().add(at), stride: width });
    product(probs, queries, seen, v_h, hd, out_h);
}

/// Scratch for [`head_backward`]: one sequence's keys and values transposed (every head's), and one head's
/// probabilities, their gradient and both transposed, each `[tokens rounded up to 64]²`.
pub struct BackwardScratch {
    keys_t: Vec<f32>,
    values_t: Vec<f32>,
    probs: Vec<f32>,
    probs_t: Vec<f32>,
    grads: Vec<f32>,
    grads_t: Vec<f32>,
    padded: usize,
}

impl BackwardScratch {
    /// Buffers for `tokens` tokens of `width`, holding `k` and `v` `[tokens, width]` transposed.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and `width` be a multiple of 16 (checked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn new(k: &[f32], v: &[f32], tokens: usize, width: usize) -> Self {
        let padded = tokens.div_ceil(COLS) * COLS;
        let (mut keys_t, mut values_t) = (vec![0.0; width * padded], vec![0.0; width * padded]);
        transpose(k, tokens, width, width, &mut keys_t, padded);
        transpose(v, tokens, width, width, &mut values_t, padded);
        let square = || vec![0.0; padded * padded];
        BackwardScratch {
            keys_t,
            values_t,
            probs: square(),
            probs_t: square(),
            grads: square(),
            grads_t: square(),
            padded,
        }
    }
}

/// Head `h` of [`super::attention_backward`] for one sequence of `tokens` (unmasked): with `P` recomputed,
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dP∘P))·scale`, `dQ = dS·K` and `dK = dSᵀ·Q`, written into
/// the head's columns of `dq`, `dk` and `dv`; `q`, `k`, `d_out` and the three gradients are `[tokens, width]`.
///
/// # Safety
/// The CPU must have AVX-512F; `hd = width / heads` must be a multiple of [`COLS`], `h < heads`, and `scratch`
/// made for `k` and `v` of this shape (all checked here).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn head_backward(
    q: &[f32],
    k: &[f32],
    d_out: &[f32],
    (tokens, width, heads, h): (usize, usize, usize, usize),
    scratch: &mut BackwardScratch,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (n, hd, padded) = (tokens, width / heads, scratch.padded);
    assert!(hd.is_multiple_of(COLS) && h < heads && padded >= n && padded.is_multiple_of(COLS));
    assert!(scratch.keys_t.len() == width * padded && scratch.values_t.len() == width * padded);
    assert!([&scratch.probs, &scratch.probs_t, &scratch.grads, &scratch.grads_t]
        .iter()
        .all(|b| b.len() == padded * padded));
    assert!([q, k, d_out].iter().all(|t| t.len() >= n * width));
    assert!([&*dq, &*dk, &*dv].iter().all(|t| t.len() >= n * width));
    let (at, scale) = (h * hd, (hd as f32).powf(-0.5));
    let s = &mut *scratch;
    // The head's columns of a `[tokens, width]` matrix, and a square `[padded, padded]` buffer or the head's
    // rows of a transposed one.
    let head = |t: *const f32| Strided { at: t.add(at), stride: width };
    let head_mut = |t: &mut [f32]| Strided { at: t.as_mut_ptr().add(at), stride: width };
    let square = |t: *const f32| Strided { at: t, stride: padded };
    let (all, terms) = (|_: usize| n, |_: usize| hd);
    let (q_h, k_h, d_out_h) = (head(q.as_ptr()), head(k.as_ptr()), head(d_out.as_ptr()));
    let probs = Strided { at: s.probs.as_mut_ptr(), stride: padded };
    product(q_h, n, terms, square(s.keys_t.as_ptr().add(at * padded)), padded, probs);
    for row in s.probs.chunks_exact_mut(padded).take(n) {
        softmax_rows(&mut row[..n], n, scale);
    }
    transpose(&s.probs, n, padded, padded, &mut s.probs_t, padded);
    product(square(s.probs_t.as_ptr()), n, all, d_out_h, hd, head_mut(dv));
    let grads = Strided { at: s.grads.as_mut_ptr(), stride: padded };
    product(d_out_h, n, terms, square(s.values_t.as_ptr().add(at * padded)), padded, grads);
    for (grad, prob) in s.grads.chunks_exact_mut(padded).zip(s.probs.chunks_exact(padded)).take(n) {
        let (grad, prob) = (&mut grad[..n], &prob[..n]);
        let dot = super::dot(grad, prob);
        grad.iter_mut().zip(prob).for_each(|(d, p)| *d = p * (*d - dot) * scale);
    }
    product(square(s.grads.as_ptr()), n, all, k_h, hd, head_mut(dq));
    transpose(&s.grads, n, padded, padded, &mut s.grads_t, padded);
    product(square(s.grads_t.as_ptr()), n, all, q_h, hd, head_mut(dk));
}

/// A row-major matrix in memory: its first element and its row stride.
#[derive(Clone, Copy)]
struct Strided<P> {
    at: P,
    stride: usize,
}

/// `out[i, :cols] = Σ_{e < depth} a[i, e] · b[e, :cols]` for `rows` rows of `a`, where a run of rows ending at
/// row `i` sums `depth(i)` terms (under a causal mask, the keys its last row sees); `cols` a multiple of 64.
/// Both products of attention: the scores (`b` the transposed keys) and the probabilities times the values.
#[target_feature(enable = "avx512f")]
unsafe fn product(
    a: Strided<*const f32>,
    rows: usize,
    depth: impl Fn(usize) -> usize,
    b: Strided<*const f32>,
    cols: usize,
    out: Strided<*mut f32>,
) {
    for (i0, run) in even_runs(rows, MAX_ROWS) {
        let a = Strided { at: a.at.add(i0 * a.stride), ..a };
        let (depth, out) = (depth(i0 + run - 1), Strided { at: out.at.add(i0 * out.stride), ..out });
        match run {
            1 => product_rows::<1>(a, depth, b, cols, out),
            2 => product_rows::<2>(a, depth, b, cols, out),
            3 => product_rows::<3>(a, depth, b, cols, out),
            4 => product_rows::<4>(a, depth, b, cols, out),
            5 => product_rows::<5>(a, depth, b, cols, out),
            _ => product_rows::<MAX_ROWS>(a, depth, b, cols, out),
        }
    }
}

/// [`product`] for `R` rows, in passes of 64 columns: each term loads four vectors of a row of `b` and
/// broadcasts one value of each row of `a`.
#[target_feature(enable = "avx512f")]
unsafe fn product_rows<const R: usize>(
    a: Strided<*const f32>,
    depth: usize,
    b: Strided<*const f32>,
    cols: usize,
    out: Strided<*mut f32>,
) {
    for c0 in (0..cols).step_by(COLS) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for e in 0..depth {
            let row = b.at.add(e * b.stride + c0);
            let bv = [
                _mm512_loadu_ps(row),
                _mm512_loadu_ps(row.add(16)),
                _mm512_loadu_ps(row.add(32)),
                _mm512_loadu_ps(row.add(48)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.at.add(r * a.stride + e));
                for (sum, &bv) in acc.iter_mut().zip(&bv) {
                    *sum = _mm512_fmadd_ps(av, bv, *sum);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (l, &sum) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.at.add(r * out.stride + c0 + 16 * l), sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_16x16_blocks_and_pads_the_keys() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let span = Span { queries: 3, keys: 21, width: 32, heads: 1, causal: false };
        let k: Vec<f32> = (0..span.keys * span.width).map(|i| i as f32).collect();
        // SAFETY: AVX-512F was detected.
        let scratch = unsafe { Scratch::new(&k, span) };
        assert_eq!(scratch.padded, 64);
        for c in 0..span.width {
            for j in 0..scratch.padded {
                let want = if j < span.keys { k[j * span.width + c] } else { 0.0 };
                assert_eq!(scratch.keys_t[c * scratch.padded + j], want, "column {c}, key {j}");
            }
        }
    }
}
