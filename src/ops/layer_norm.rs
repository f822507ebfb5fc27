//! LayerNorm over the last axis, statistics accumulated in f64.

use rayon::prelude::*;

/// Normalises each row of `x` (`rows × width`, row-major) and applies `weight` and `bias`.
pub fn layer_norm(x: &[f32], width: usize, weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(out, row)| {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
            *o = ((v as f64 - mean) * inv) as f32 * w + b;
        }
    });
    y
}

/// Backward of [`layer_norm`] with respect to its input (the affine parameters are frozen):
/// `dx = (1/σ)·(ĝ − mean(ĝ) − x̂·mean(ĝ∘x̂))` with `ĝ = dy∘weight`, per row, in f64.
pub fn layer_norm_backward(x: &[f32], width: usize, weight: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(width).zip(x.par_chunks(width).zip(dy.par_chunks(width))).for_each(|(out, (row, g))| {
        let n = width as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        let xhat: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * inv).collect();
        let ghat: Vec<f64> = g.iter().zip(weight).map(|(&g, &w)| g as f64 * w as f64).collect();
        let mean_g = ghat.iter().sum::<f64>() / n;
        let mean_gx = ghat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
        for ((o, gh), xh) in out.iter_mut().zip(&ghat).zip(&xhat) {
            *o = (inv * (gh - mean_g - xh * mean_gx)) as f32;
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_zero_mean_unit_variance_before_the_affine() {
        let x: Vec<f32> = (0..15).map(|i| (i * i) as f32 * 0.3 - 2.0).collect();
        let y = layer_norm(&x, 5, &[1.0; 5], &[0.0; 5], 1e-5);
        for row in y.chunks(5) {
            let mean: f32 = row.iter().sum::<f32>() / 5.0;
            let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 5.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "mean {mean} var {var}");
        }
        let z = layer_norm(&x, 5, &[2.0; 5], &[0.5; 5], 1e-5);
        for (a, b) in y.iter().zip(&z) {
            assert!((a * 2.0 + 0.5 - b).abs() < 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (rows, width) = (3, 7);
        let (x, w, b, g) = (values(rows * width, 1), values(width, 2), values(width, 3), values(rows * width, 4));
        let loss = |x: &[f64]| -> f64 {
            x.chunks(width)
                .zip(g.chunks(width))
                .map(|(row, g)| {
                    let mean = row.iter().sum::<f64>() / width as f64;
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
                    let inv = 1.0 / (var + 1e-5).sqrt();
                    (0..width).map(|i| g[i] as f64 * ((row[i] - mean) * inv * w[i] as f64 + b[i] as f64)).sum::<f64>()
                })
                .sum()
        };
        let dx = layer_norm_backward(&x, width, &w, 1e-5, &g);
        assert_gradient("dx", &dx, &numeric_gradient(&loss, &f64s(&x)), 1e-5);
    }
}
