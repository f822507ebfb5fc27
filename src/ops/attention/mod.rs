//! Multi-head scaled dot-product attention: unmasked (CLIP's vision encoder attends to all tokens) or causal
//! (its text encoder: each token attends to itself and those before it).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::activation::exp_f32;
#[cfg(target_arch = "x86_64")]
use super::expert_linear::Kernel;
use super::gemm::{matmul, MatRef, Threads};

#[cfg(target_arch = "x86_64")]
mod avx512;

/// `softmax(q_h k_hᵀ / sqrt(d_h)) v_h` for each sample and head; `q`, `k`, `v` are `[batch, tokens, width]`
/// with heads splitting `width`. Returns `[batch, tokens, width]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
) -> Result<Vec<f32>> {
    let sample = tokens * width;
    let mut out = vec![0.0f32; batch * sample];
    out.par_chunks_mut(sample).enumerate().try_for_each(|(b, out_b)| {
        let at = b * sample..(b + 1) * sample;
        let (q, k, v) = (&q[at.clone()], &k[at.clone()], &v[at]);
        attend(q, k, v, Span { queries: tokens, keys: tokens, width, heads, causal: false }, out_b)
    })?;
    Ok(out)
}

/// The shape of one sequence's attention for [`attend`].
#[derive(Clone, Copy, Debug)]
pub struct Span {
    /// Query rows.
    pub queries: usize,
    /// Key and value rows: the queries' own and, before them, any cached prefix's.
    pub keys: usize,
    /// Row width, split by `heads`.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Whether query i, the sequence's token `keys − queries + i`, attends only to keys up to its own
    /// (CLIP's text encoder); else to all.
    pub causal: bool,
}

/// One sequence's multi-head attention into `out` `[queries, width]`, for `q` `[queries, width]` and `k`, `v`
/// `[keys, width]` (row-major). With `keys > queries` the first rows of `k` and `v` are a prefix computed
/// before (its hidden states are the same for every sequence that shares it, under a causal mask).
pub fn attend(q: &[f32], k: &[f32], v: &[f32], span: Span, out: &mut [f32]) -> Result<()> {
    let Span { queries, keys, width, heads, causal } = span;
    ensure!(
        keys >= queries && q.len() == queries * width && k.len() == keys * width && v.len() == keys * width,
        "attend: {queries} queries and {keys} keys of width {width} do not fit {}, {} and {} values",
        q.len(),
        k.len(),
        v.len()
    );
    ensure!(out.len() == queries * width, "attend: the output holds {} values, {} needed", out.len(), q.len());
    let head_dim = width / heads;
    #[cfg(target_arch = "x86_64")]
    if avx512_heads(width, heads) {
        // SAFETY: AVX-512F was detected, the width is a multiple of the head width, itself of 64, and the
        // scratch is the span's.
        unsafe {
            let mut scratch = avx512::Scratch::new(k, span);
            for h in 0..heads {
                avx512::head(q, v, span, h, &mut scratch, out);
            }
        }
        return Ok(());
    }
    let scale = (head_dim as f32).powf(-0.5);
    let offset = keys - queries;
    let mut scores = vec![0.0f32; queries * keys];
    let mut head_out = vec![0.0f32; queries * head_dim];
    fn view(t: &[f32], at: usize, rows: usize, cols: usize, stride: usize) -> Result<MatRef<'_>> {
        MatRef::strided(&t[at..], rows, cols, stride, 1)
    }
    for h in 0..heads {
        let at = h * head_dim;
        let keys_h = view(k, at, keys, head_dim, width)?;
        matmul(view(q, at, queries, head_dim, width)?, keys_h.t(), &mut scores, false, Threads::Single)?;
        if causal {
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let seen = offset + i + 1;
                softmax_rows(&mut row[..seen], seen, scale);
                row[seen..].fill(0.0);
            }
        } else {
            softmax_rows(&mut scores, keys, scale);
        }
        let probs = MatRef::row_major(&scores, queries, keys)?;
        matmul(probs, view(v, at, keys, head_dim, width)?, &mut head_out, false, Threads::Single)?;
        for (t, row) in head_out.chunks_exact(head_dim).enumerate() {
            out[t * width + at..][..head_dim].copy_from_slice(row);
        }
    }
    Ok(())
}

/// Whether the AVX-512 kernels take these heads: heads splitting `width` evenly, each a multiple of 64 wide,
/// on a CPU with AVX-512F (what their safety conditions ask).
#[cfg(target_arch = "x86_64")]
fn avx512_heads(width: usize, heads: usize) -> bool {
    let head_dim = width / heads;
    head_dim.is_multiple_of(avx512::COLS) && head_dim * heads == width && Kernel::detect() == Kernel::Avx512
}

/// Each row of `scores` (rows of `n`) replaced by softmax(scale · row), in place. In passes whose reductions
/// keep one partial per lane: a running f32 sum or maximum is a dependency chain no loop vectorises.
/// Always inlined, so that the AVX-512 kernels vectorise it for their own registers (called from two of them,
/// it was left a call to code built for SSE2, a fifth of the attention's time).
#[inline(always)]
fn softmax_rows(scores: &mut [f32], n: usize, scale: f32) {
    for row in scores.chunks_exact_mut(n) {
        // scale > 0, and rounding is monotonic: max(row)·scale is max(row·scale) exactly.
        let max = lanes(row, None, f32::NEG_INFINITY, f32::max) * scale;
        row.iter_mut().for_each(|s| *s = exp_f32(*s * scale - max));
        let inv = 1.0 / lanes(row, None, 0.0, |a, b| a + b);
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// Σ a∘b.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    lanes(a, Some(b), 0.0, |a, b| a + b)
}

/// `a` (times `b` element-wise, when given) folded by `f` into 8 lane partials, element i into lane i mod 8,
/// then the partials folded in order.
#[inline(always)]
fn lanes(a: &[f32], b: Option<&[f32]>, init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let value = |i: usize| b.map_or(a[i], |b| a[i] * b[i]);
    let mut acc = [init; 8];
    let whole = a.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        for (l, slot) in acc.iter_mut().enumerate() {
            *slot = f(*slot, value(i + l));
        }
    }
    for i in whole..a.len() {
        acc[i % 8] = f(acc[i % 8], value(i));
    }
    acc.into_iter().fold(init, f)
}

/// Backward of [`attention`]: `(dq, dk, dv)` for the output gradient `d_out`, all `[batch, tokens, width]`.
/// The probabilities are recomputed from `q` and `k` (nothing but the inputs is kept for backward):
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dP∘P))`, `dQ = s·dS·K`, `dK = s·dSᵀ·Q`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let head_dim = width / heads;
    let scale = (head_dim as f32).powf(-0.5);
    let sample = tokens * width;
    ensure!(
        [q, k, v, d_out].iter().all(|t| t.len() == batch * sample),
        "attention_backward: inputs do not hold {batch}×{tokens}×{width} values"
    );
    // Written in place, sample by sample: no per-sample buffers to concatenate afterwards.
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; batch * sample], vec![0.0f32; batch * sample], vec![0.0f32; batch * sample]);
    let samples = dq.par_chunks_mut(sample).zip(dk.par_chunks_mut(sample)).zip(dv.par_chunks_mut(sample));
    #[cfg(target_arch = "x86_64")]
    let fast = avx512_heads(width, heads);
    samples.enumerate().try_for_each(|(b, ((dq_b, dk_b), dv_b))| -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if fast {
            let at = b * sample..(b + 1) * sample;
            let (q, k, v, d_out) = (&q[at.clone()], &k[at.clone()], &v[at.clone()], &d_out[at]);
            // SAFETY: AVX-512F was detected, the width is a multiple of the head width, itself of 64, and the
            // scratch is this sequence's.
            unsafe {
                let mut scratch = avx512::BackwardScratch::new(k, v, tokens, width);
                for h in 0..heads {
                    avx512::head_backward(q, k, d_out, (tokens, width, heads, h), &mut scratch, dq_b, dk_b, dv_b);
                }
            }
            return Ok(());
        }
        let (n, hd) = (tokens, head_dim);
        let mut p = vec![0.0f32; n * n];
        let mut dp = vec![0.0f32; n * n];
        let mut tmp = vec![0.0f32; n * hd];
        fn view(t: &[f32], at: usize, rows: usize, cols: usize, stride: usize) -> Result<MatRef<'_>> {
            MatRef::strided(&t[at..], rows, cols, stride, 1)
        }
        for h in 0..heads {
            let at = b * sample + h * hd;
            let (qv, kv, vv, gv) = (
                view(q, at, n, hd, width)?,
                view(k, at, n, hd, width)?,
                view(v, at, n, hd, width)?,
                view(d_out, at, n, hd, width)?,
            );
            matmul(qv, kv.t(), &mut p, false, Threads::Single)?;
            softmax_rows(&mut p, n, scale);
            let scatter = |src: &[f32], dst: &mut [f32]| {
                for (t, row) in src.chunks_exact(hd).enumerate() {
                    dst[t * width + h * hd..][..hd].copy_from_slice(row);
                }
            };
            // dV = Pᵀ dO
            matmul(MatRef::row_major(&p, n, n)?.t(), gv, &mut tmp, false, Threads::Single)?;
            scatter(&tmp, dv_b);
            // dP = dO Vᵀ, then dS in place.
            matmul(gv, vv.t(), &mut dp, false, Threads::Single)?;
            for (drow, prow) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                let dot = dot(drow, prow);
                drow.iter_mut().zip(prow).for_each(|(d, p)| *d = p * (*d - dot) * scale);
            }
            let ds = MatRef::row_major(&dp, n, n)?;
            matmul(ds, kv, &mut tmp, false, Threads::Single)?;
            scatter(&tmp, dq_b);
            matmul(ds.t(), qv, &mut tmp, false, Threads::Single)?;
            scatter(&tmp, dk_b);
        }
        Ok(())
    })?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `attention` (every sample, unmasked) and `attend` (one sequence, causal, with each count of `queries`:
    /// the last rows of `q` after a prefix of cached keys) against a naive f64 loop, within 1e-5.
    fn assert_matches_f64(qkv: [&[f32]; 3], (b, n, d, h): (usize, usize, usize, usize), queries: &[usize]) {
        let [q, k, v] = qkv;
        let hd = d / h;
        // Row i of q against the first `seen` keys of sample bi, in column c.
        let naive = |bi: usize, i: usize, c: usize, causal: bool| -> f64 {
            let idx = |t: usize, e: usize| bi * n * d + t * d + c / hd * hd + e;
            let seen = if causal { i + 1 } else { n };
            let s: Vec<f64> = (0..seen)
                .map(|j| (0..hd).map(|e| q[idx(i, e)] as f64 * k[idx(j, e)] as f64).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let mx = s.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            (0..seen).map(|j| (s[j] - mx).exp() / z * v[idx(j, c % hd)] as f64).sum()
        };
        let got = attention(q, k, v, b, n, d, h).unwrap();
        for (at, g) in got.iter().enumerate() {
            let (bi, i, c) = (at / (n * d), at / d % n, at % d);
            let want = naive(bi, i, c, false);
            assert!(
                (*g as f64 - want).abs() < 1e-5,
                "unmasked, sample {bi}, token {i}, column {c}: {g} against {want}"
            );
        }
        for &queries in queries {
            let span = Span { queries, keys: n, width: d, heads: h, causal: true };
            let mut out = vec![f32::NAN; queries * d];
            attend(&q[(n - queries) * d..n * d], &k[..n * d], &v[..n * d], span, &mut out).unwrap();
            for (at, g) in out.iter().enumerate() {
                let (i, c) = (n - queries + at / d, at % d);
                let want = naive(0, i, c, true);
                assert!(
                    (*g as f64 - want).abs() < 1e-5,
                    "{queries} queries, token {i}, column {c}: {g} against {want}"
                );
            }
        }
    }

    /// Narrow heads, and heads 32 wide (the `gemm` path on every CPU: the AVX-512 kernels take multiples of 64).
    #[test]
    fn matches_a_naive_loop_unmasked_causal_and_after_a_prefix() {
        for (b, n, d, h) in [(2, 5, 6, 3), (2, 5, 64, 2)] {
            let gen = |s: usize| (0..b * n * d).map(|i| (((i + s) * 37) % 23) as f32 / 11.0 - 1.0).collect::<Vec<_>>();
            let (q, k, v) = (gen(1), gen(5), gen(9));
            assert_matches_f64([&q, &k, &v], (b, n, d, h), &[n, 2, 1]);
        }
    }

    /// Heads 64 wide (the AVX-512 kernels where the CPU has them), with more keys than one pass of 64 and
    /// query counts that do not split into equal runs.
    #[test]
    fn heads_64_wide_match_f64_unmasked_causal_and_after_a_prefix() {
        let (b, n, d, h) = (2, 70, 128, 2);
        let gen = |s: usize| (0..b * n * d).map(|i| (((i + s) * 7919) % 101) as f32 / 50.0 - 1.0).collect::<Vec<_>>();
        let (q, k, v) = (gen(1), gen(17), gen(33));
        assert_matches_f64([&q, &k, &v], (b, n, d, h), &[n, 13, 1]);
    }

    /// `Σ g ∘ attention(q, k, v)` in f64 (unmasked), for `(batch, tokens, width, heads)`: the loss whose
    /// gradients the backward tests difference.
    fn weighted_attention_sum(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        g: &[f32],
        (b, n, d, h): (usize, usize, usize, usize),
    ) -> f64 {
        let hd = d / h;
        let mut total = 0.0;
        for bi in 0..b {
            for hi in 0..h {
                let idx = |t: usize, c: usize| bi * n * d + t * d + hi * hd + c;
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| (0..hd).map(|c| q[idx(i, c)] * k[idx(j, c)]).sum::<f64>() / (hd as f64).sqrt())
                        .collect();
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        let o: f64 = (0..n).map(|j| e[j] / z * v[idx(j, c)]).sum();
                        total += g[idx(i, c)] as f64 * o;
                    }
                }
            }
        }
        total
    }

    /// The backward with heads 64 wide (the AVX-512 kernels where the CPU has them) and more tokens than one
    /// pass of 64, against central differences of an f64 forward along random directions: for each input `x`
    /// and direction `u`, `(L(x + εu) − L(x − εu)) / 2ε` against `<dL/dx, u>`, with `L = Σ g ∘ attention`.
    #[test]
    fn backward_with_heads_64_wide_matches_directional_differences() {
        use crate::ops::gradcheck::*;
        let (b, n, d, h) = (2, 70, 128, 2);
        let len = b * n * d;
        let (q, k, v, g) = (values(len, 1), values(len, 2), values(len, 3), values(len, 4));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| weighted_attention_sum(q, k, v, &g, (b, n, d, h));
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &g, b, n, d, h).unwrap();
        let (qf, kf, vf) = (f64s(&q), f64s(&k), f64s(&v));
        let eps = 1e-4;
        for seed in [5, 6] {
            let u = f64s(&values(len, seed));
            let along =
                |x: &[f64], sign: f64| -> Vec<f64> { x.iter().zip(&u).map(|(x, u)| x + sign * eps * u).collect() };
            for (input, (what, grad)) in [("dq", &dq), ("dk", &dk), ("dv", &dv)].into_iter().enumerate() {
                let f = |x: &[f64]| match input {
                    0 => loss(x, &kf, &vf),
                    1 => loss(&qf, x, &vf),
                    _ => loss(&qf, &kf, x),
                };
                let x = [&qf, &kf, &vf][input];
                let numeric = (f(&along(x, 1.0)) - f(&along(x, -1.0))) / (2.0 * eps);
                let analytic: f64 = grad.iter().zip(&u).map(|(g, u)| *g as f64 * u).sum();
                let magnitude: f64 = grad.iter().zip(&u).map(|(g, u)| (*g as f64 * u).abs()).sum();
                assert!(
                    (numeric - analytic).abs() <= 1e-4 * magnitude,
                    "{what}, direction {seed}: {analytic} against {numeric} (terms' magnitude {magnitude})"
                );
            }
        }
    }

    /// Rows longer than the 8 lane partials (two runs of 8 and a remainder), against f64.
    #[test]
    fn softmax_rows_and_dot_match_f64_past_the_lane_count() {
        let (n, scale) = (19, 0.37);
        let rows: Vec<f32> = (0..3 * n).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0).collect();
        let mut got = rows.clone();
        softmax_rows(&mut got, n, scale);
        for (row, probs) in rows.chunks(n).zip(got.chunks(n)) {
            let m = row.iter().map(|&v| v as f64 * scale as f64).fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|&v| (v as f64 * scale as f64 - m).exp()).sum();
            for (&v, &p) in row.iter().zip(probs) {
                let want = (v as f64 * scale as f64 - m).exp() / z;
                assert!((p as f64 - want).abs() < 1e-6, "{p} against {want}");
            }
        }
        let (a, b) = (&rows[..n], &rows[n..2 * n]);
        let want: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(a, b) as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "{} against {want}", dot(a, b));
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (b, n, d, h) = (2, 5, 6, 3);
        let (q, k, v, g) = (values(b * n * d, 1), values(b * n * d, 2), values(b * n * d, 3), values(b * n * d, 4));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| weighted_attention_sum(q, k, v, &g, (b, n, d, h));
        let (qf, kf, vf) = (f64s(&q), f64s(&k), f64s(&v));
        let (dq, dk, dv) = attention_backward(&q, &k, &v, &g, b, n, d, h).unwrap();
        assert_gradient("dq", &dq, &numeric_gradient(&|x| loss(x, &kf, &vf), &qf), 1e-5);
        assert_gradient("dk", &dk, &numeric_gradient(&|x| loss(&qf, x, &vf), &kf), 1e-5);
        assert_gradient("dv", &dv, &numeric_gradient(&|x| loss(&qf, &kf, x), &vf), 1e-5);
    }
}
