//! The router's reduction: per token outputs `[B, N, T]`, optionally softmax over experts, mean over tokens.

use rayon::prelude::*;

use super::activation::exp_f32;

/// `[batch, tokens, experts]` to `[batch, experts]`: each token's outputs (softmaxed over experts when
/// `softmax`), averaged over the sample's tokens, in f64.
pub fn router_reduce(logits: &[f32], batch: usize, tokens: usize, experts: usize, softmax: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; batch * experts];
    out.par_chunks_mut(experts).zip(logits.par_chunks(tokens * experts)).take(batch).for_each(|(w, sample)| {
        let mut sum = vec![0.0f64; experts];
        let mut probs = vec![0.0f32; experts];
        for token in sample.chunks_exact(experts) {
            if softmax {
                let max = token.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                token.iter().zip(probs.iter_mut()).for_each(|(&l, p)| *p = exp_f32(l - max));
                let z: f32 = probs.iter().sum();
                probs.iter().zip(sum.iter_mut()).for_each(|(&p, s)| *s += (p / z) as f64);
            } else {
                token.iter().zip(sum.iter_mut()).for_each(|(&l, s)| *s += l as f64);
            }
        }
        w.iter_mut().zip(&sum).for_each(|(w, s)| *w = (s / tokens as f64) as f32);
    });
    out
}

/// Mean over the rows of `[rows, width]`: `[1, width]`.
pub fn mean_rows(x: &[f32], width: usize) -> Vec<f32> {
    let rows = x.len() / width;
    let mut sum = vec![0.0f64; width];
    for row in x.chunks_exact(width) {
        row.iter().zip(sum.iter_mut()).for_each(|(&v, s)| *s += v as f64);
    }
    sum.into_iter().map(|s| (s / rows as f64) as f32).collect()
}

/// Backward of [`router_reduce`]: the gradient of the per-token outputs `[B, N, T]` from that of the
/// coefficients `dw` `[B, T]`: `dw/N` for identity, `p∘(dw − Σ_t dw·p)/N` through the softmax.
pub fn router_reduce_backward(
    logits: &[f32],
    batch: usize,
    tokens: usize,
    experts: usize,
    softmax: bool,
    dw: &[f32],
) -> Vec<f32> {
    let mut dl = vec![0.0f32; batch * tokens * experts];
    let inv = 1.0 / tokens as f32;
    dl.par_chunks_mut(tokens * experts).zip(logits.par_chunks(tokens * experts)).enumerate().for_each(
        |(b, (out, sample))| {
            let g = &dw[b * experts..(b + 1) * experts];
            for (o, token) in out.chunks_exact_mut(experts).zip(sample.chunks_exact(experts)) {
                if softmax {
                    let max = token.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let p: Vec<f32> = token.iter().map(|&l| exp_f32(l - max)).collect();
                    let z: f32 = p.iter().sum();
                    let dot: f32 = p.iter().zip(g).map(|(p, g)| p / z * g).sum();
                    o.iter_mut().zip(&p).zip(g).for_each(|((o, p), g)| *o = p / z * (g - dot) * inv);
                } else {
                    o.iter_mut().zip(g).for_each(|(o, g)| *o = g * inv);
                }
            }
        },
    );
    dl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_token_mean_and_softmax_rows_sum_to_one() {
        // 1 sample, 2 tokens, 3 experts.
        let logits = [1.0, 2.0, 3.0, 3.0, 0.0, -1.0];
        assert_eq!(router_reduce(&logits, 1, 2, 3, false), vec![2.0, 1.0, 1.0]);
        let soft = router_reduce(&logits, 1, 2, 3, true);
        assert!((soft.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let e = |v: &[f64]| -> Vec<f64> {
            let z: f64 = v.iter().map(|x| x.exp()).sum();
            v.iter().map(|x| x.exp() / z).collect()
        };
        let (a, b) = (e(&[1.0, 2.0, 3.0]), e(&[3.0, 0.0, -1.0]));
        for t in 0..3 {
            assert!((soft[t] as f64 - (a[t] + b[t]) / 2.0).abs() < 1e-6);
        }
        assert_eq!(mean_rows(&[1.0, 2.0, 3.0, 6.0], 2), vec![2.0, 4.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (b, n, t) = (2, 4, 3);
        let (logits, g) = (values(b * n * t, 1), values(b * t, 2));
        for softmax in [false, true] {
            let loss = |l: &[f64]| -> f64 {
                let mut total = 0.0;
                for bi in 0..b {
                    for tok in l[bi * n * t..(bi + 1) * n * t].chunks(t) {
                        let w: Vec<f64> = if softmax {
                            let z: f64 = tok.iter().map(|x| x.exp()).sum();
                            tok.iter().map(|x| x.exp() / z).collect()
                        } else {
                            tok.to_vec()
                        };
                        total += w.iter().zip(&g[bi * t..]).map(|(w, &g)| w * g as f64).sum::<f64>() / n as f64;
                    }
                }
                total
            };
            let dl = router_reduce_backward(&logits, b, n, t, softmax, &g);
            assert_gradient(&format!("softmax {softmax}"), &dl, &numeric_gradient(&loss, &f64s(&logits)), 1e-6);
        }
    }
}
