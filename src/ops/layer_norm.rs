//! LayerNorm over the last axis, statistics accumulated in f64.

use rayon::prelude::*;

/// Normalises each row of `x` (`rows × width`, row-major) and applies `weight` and `bias`.
/// Panics unless `weight` and `bias` have `width` elements and `x` whole rows of it.
pub fn layer_norm(x: &[f32], width: usize, weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    assert!(
        weight.len() == width && bias.len() == width && x.len().is_multiple_of(width),
        "layer_norm: weight {}, bias {} and {} inputs do not make rows of {width}",
        weight.len(),
        bias.len(),
        x.len()
    );
    let mut y = Vec::with_capacity(x.len());
    y.spare_capacity_mut()[..x.len()].par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(out, row)| {
        let (mean, inv) = statistics(row, eps);
        for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
            o.write(((v as f64 - mean) * inv) as f32 * w + b);
        }
    });
    // SAFETY: `x` is whole rows of `width` (asserted), each written in full: `weight` and `bias` are as wide.
    unsafe { y.set_len(x.len()) };
    y
}

/// Backward of [`layer_norm`] with respect to its input (the affine parameters are frozen):
/// `dx = (1/σ)·(ĝ − mean(ĝ) − x̂·mean(ĝ∘x̂))` with `ĝ = dy∘weight`, per row, in f64.
/// Panics unless `weight` has `width` elements and `x` and `dy` the same whole rows of it.
pub fn layer_norm_backward(x: &[f32], width: usize, weight: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    assert!(
        weight.len() == width && dy.len() == x.len() && x.len().is_multiple_of(width),
        "layer_norm_backward: weight {}, {} inputs and {} gradients do not make rows of {width}",
        weight.len(),
        x.len(),
        dy.len()
    );
    let mut dx = Vec::with_capacity(x.len());
    dx.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(width)
        .zip(x.par_chunks(width).zip(dy.par_chunks(width)))
        .for_each(|(out, (row, g))| {
            let n = width as f64;
            let (mean, inv) = statistics(row, eps);
            let mean_g = lane_sum(g, weight, row, |g, w, _| g * w) / n;
            let mean_gx = lane_sum(g, weight, row, |g, w, v| g * w * (v - mean)) * inv / n;
            for (((o, &g), &w), &v) in out.iter_mut().zip(g).zip(weight).zip(row) {
                let (gh, xh) = (g as f64 * w as f64, (v as f64 - mean) * inv);
                o.write((inv * (gh - mean_g - xh * mean_gx)) as f32);
            }
        });
    // SAFETY: as in `layer_norm`: whole rows (asserted), `dy` and `weight` as wide, each row written in full.
    unsafe { dx.set_len(x.len()) };
    dx
}

/// Backward of [`layer_norm`] with respect to its affine parameters: `(Σ_rows dy∘x̂, Σ_rows dy)`, summed over
/// rows in order in f64. Panics unless `x` and `dy` are the same whole rows of `width`.
pub fn layer_norm_backward_params(x: &[f32], width: usize, eps: f32, dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        dy.len() == x.len() && x.len().is_multiple_of(width),
        "layer_norm_backward_params: {} inputs and {} gradients do not make rows of {width}",
        x.len(),
        dy.len()
    );
    let (mut dw, mut db) = (vec![0.0f64; width], vec![0.0f64; width]);
    for (row, g) in x.chunks_exact(width).zip(dy.chunks_exact(width)) {
        let (mean, inv) = statistics(row, eps);
        for (((dw, db), &v), &g) in dw.iter_mut().zip(db.iter_mut()).zip(row).zip(g) {
            *dw += g as f64 * ((v as f64 - mean) * inv);
            *db += g as f64;
        }
    }
    (dw.into_iter().map(|v| v as f32).collect(), db.into_iter().map(|v| v as f32).collect())
}

/// A row's mean and `1/sqrt(var + eps)`, in f64.
fn statistics(row: &[f32], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = lane_sum(row, row, row, |v, _, _| v) / n;
    let var = lane_sum(row, row, row, |v, _, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// Partial sums a row is added in: element `i` into lane `i % LANES`.
const LANES: usize = 8;

/// `Σ_i f(a_i, b_i, c_i)` in f64 over three rows of one length, in [`LANES`] interleaved partial sums combined
/// in a fixed order, then the tail. One running sum is a chain of dependent adds, which no loop vectorises;
/// eight independent ones do, and the order, so the result, is the same on every machine and thread count.
fn lane_sum(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f64, f64, f64) -> f64) -> f64 {
    let ((ac, at), (bc, bt), (cc, ct)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>(), c.as_chunks::<LANES>());
    let mut lanes = [0.0f64; LANES];
    for ((a, b), c) in ac.iter().zip(bc).zip(cc) {
        for l in 0..LANES {
            lanes[l] += f(a[l] as f64, b[l] as f64, c[l] as f64);
        }
    }
    let tail: f64 = at.iter().zip(bt).zip(ct).map(|((&a, &b), &c)| f(a as f64, b as f64, c as f64)).sum();
    let [l0, l1, l2, l3, l4, l5, l6, l7] = lanes;
    (((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    /// The forward in plain f64, one running sum per statistic.
    fn reference(x: &[f32], width: usize, w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
        let mut y = Vec::new();
        for row in x.chunks(width) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (var + eps).sqrt();
            y.extend(row.iter().zip(w).zip(b).map(|((&v, &w), &b)| (v as f64 - mean) * inv * w as f64 + b as f64));
        }
        y
    }

    /// Widths below, at and past the eight lanes (a tail of 5), rows far from zero mean.
    #[test]
    fn forward_matches_plain_f64() {
        for (rows, width) in [(3, 5), (2, 8), (4, 45)] {
            let x: Vec<f32> = values(rows * width, 7).iter().map(|v| 3.0 * v + 10.0).collect();
            let (w, b) = (values(width, 8), values(width, 9));
            let want = reference(&x, width, &w, &b, 1e-5);
            let got = layer_norm(&x, width, &w, &b, 1e-5);
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()), "width {width}, element {i}: {g} against {r}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (rows, width) in [(3, 7), (2, 45)] {
            let (x, w, b, g) = (values(rows * width, 1), values(width, 2), values(width, 3), values(rows * width, 4));
            let loss = |x: &[f64]| -> f64 {
                x.chunks(width)
                    .zip(g.chunks(width))
                    .map(|(row, g)| {
                        let mean = row.iter().sum::<f64>() / width as f64;
                        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
                        let inv = 1.0 / (var + 1e-5).sqrt();
                        (0..width)
                            .map(|i| g[i] as f64 * ((row[i] - mean) * inv * w[i] as f64 + b[i] as f64))
                            .sum::<f64>()
                    })
                    .sum()
            };
            let dx = layer_norm_backward(&x, width, &w, 1e-5, &g);
            assert_gradient(&format!("dx, width {width}"), &dx, &numeric_gradient(&loss, &f64s(&x)), 1e-5);
        }
    }

    #[test]
    fn parameter_gradients_match_finite_differences() {
        let (rows, width) = (5, 13);
        let (x, w, b, g) = (values(rows * width, 5), values(width, 6), values(width, 7), values(rows * width, 8));
        // Σ g∘layer_norm(x; w, b) in f64, as a function of (w, b) laid end to end.
        let exact = |p: &[f64]| -> f64 {
            x.chunks(width)
                .zip(g.chunks(width))
                .map(|(row, g)| {
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
                    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
                    let inv = 1.0 / (var + 1e-5).sqrt();
                    (0..width).map(|i| g[i] as f64 * ((row[i] as f64 - mean) * inv * p[i] + p[width + i])).sum::<f64>()
                })
                .sum()
        };
        let at: Vec<f64> = f64s(&w).into_iter().chain(f64s(&b)).collect();
        let numeric = numeric_gradient(&exact, &at);
        let (dw, db) = layer_norm_backward_params(&x, width, 1e-5, &g);
        assert_gradient("d weight", &dw, &numeric[..width], 1e-6);
        assert_gradient("d bias", &db, &numeric[width..], 1e-6);
    }
}
