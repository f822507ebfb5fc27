//! Multi-head scaled dot-product attention without masking (CLIP's vision encoder attends to all tokens).

use anyhow::Result;
use rayon::prelude::*;

use super::activation::exp_f32;
use super::gemm::{matmul, MatRef, Threads};

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
    let head_dim = width / heads;
    let scale = (head_dim as f32).powf(-0.5);
    let sample = tokens * width;
    let mut out = vec![0.0f32; batch * sample];
    out.par_chunks_mut(sample).enumerate().try_for_each(|(b, out_b)| -> Result<()> {
        let mut scores = vec![0.0f32; tokens * tokens];
        let mut head_out = vec![0.0f32; tokens * head_dim];
        for h in 0..heads {
            let at = b * sample + h * head_dim;
            fn view(t: &[f32], at: usize, rows: usize, cols: usize, stride: usize) -> Result<MatRef<'_>> {
                MatRef::strided(&t[at..], rows, cols, stride, 1)
            }
            matmul(
                view(q, at, tokens, head_dim, width)?,
                view(k, at, tokens, head_dim, width)?.t(),
                &mut scores,
                false,
                Threads::Single,
            )?;
            for row in scores.chunks_exact_mut(tokens) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                let mut sum = 0.0f32;
                for s in row.iter_mut() {
                    *s = exp_f32(*s * scale - max);
                    sum += *s;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            let probs = MatRef::row_major(&scores, tokens, tokens)?;
            matmul(probs, view(v, at, tokens, head_dim, width)?, &mut head_out, false, Threads::Single)?;
            for (t, row) in head_out.chunks_exact(head_dim).enumerate() {
                out_b[t * width + h * head_dim..][..head_dim].copy_from_slice(row);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_loop() {
        let (b, n, d, h) = (2, 5, 6, 3);
        let gen = |s: usize| (0..b * n * d).map(|i| (((i + s) * 37) % 23) as f32 / 11.0 - 1.0).collect::<Vec<_>>();
        let (q, k, v) = (gen(1), gen(5), gen(9));
        let got = attention(&q, &k, &v, b, n, d, h).unwrap();
        let hd = d / h;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    let idx = |t: usize, c: usize| bi * n * d + t * d + hi * hd + c;
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..hd).map(|c| q[idx(i, c)] as f64 * k[idx(j, c)] as f64).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                    for c in 0..hd {
                        let want: f64 = (0..n).map(|j| (s[j] - mx).exp() / z * v[idx(j, c)] as f64).sum();
                        assert!((got[idx(i, c)] as f64 - want).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
