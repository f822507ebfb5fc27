//! Finite differences in f64 for the backward tests: central differences of an f64 reference forward,
//! compared with an analytic gradient.

/// Central-difference gradient of `f` at `x`.
pub fn numeric_gradient(f: &dyn Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let up = f(&probe);
            probe[i] = x[i] - h;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts `analytic` (from the f32 backward) matches `numeric` within `tol` of the largest magnitude.
pub fn assert_gradient(what: &str, analytic: &[f32], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: length");
    let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let worst = analytic.iter().zip(numeric).map(|(a, n)| (*a as f64 - n).abs()).fold(0.0, f64::max);
    assert!(worst / scale <= tol, "{what}: gradient off by {:.2e} relative", worst / scale);
}

/// Deterministic test values in about [-1, 1).
pub fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i + seed) * 7919 + seed * 104_729) % 211) as f32 / 105.0 - 1.0).collect()
}

/// As f64.
pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
