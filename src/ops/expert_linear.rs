//! WEMoE's linear layer with per-group merged weights:
//! `y_g = x_g · (W0 + Σ_t c[g,t] τ_t)ᵀ + (b0 + Σ_t c[g,t] β_t)` for each group `g` of rows of `x`
//! (a sample in per-sample routing; the whole batch in batch routing).
//!
//! Formulation, chosen by measurement (BENCHMARKS.md): the weight is merged in blocks of output rows
//! small enough that the T+1 source blocks stay in the core's cache; each block is merged once per group
//! and multiplied at once, so the task vectors are read from memory once per call, not once per sample,
//! and no whole merged matrix is ever materialised.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::{matmul, MatRef, Threads};

/// The weights of one WEMoE linear layer, PyTorch layout.
pub struct ExpertLinearRef<'a> {
    /// Pretrained weight `[out, in]`.
    pub base_weight: &'a [f32],
    /// Pretrained bias `[out]`.
    pub base_bias: &'a [f32],
    /// Each task's weight delta `[out, in]`.
    pub task_weights: Vec<&'a [f32]>,
    /// Each task's bias delta `[out]`.
    pub task_biases: Vec<&'a [f32]>,
    /// Output width.
    pub out_features: usize,
    /// Input width.
    pub in_features: usize,
}

impl ExpertLinearRef<'_> {
    /// Number of experts, T.
    pub fn experts(&self) -> usize {
        self.task_weights.len()
    }

    /// Rows `rows` of the merged weight and bias for coefficients `c`, into `w` and `b`.
    fn merge_rows(&self, c: &[f32], rows: std::ops::Range<usize>, w: &mut [f32], b: &mut [f32]) {
        let k = self.in_features;
        let span = rows.start * k..rows.end * k;
        w.copy_from_slice(&self.base_weight[span.clone()]);
        b.copy_from_slice(&self.base_bias[rows.clone()]);
        for ((tw, tb), &ct) in self.task_weights.iter().zip(&self.task_biases).zip(c) {
            w.iter_mut().zip(&tw[span.clone()]).for_each(|(w, t)| *w += ct * t);
            b.iter_mut().zip(&tb[rows.clone()]).for_each(|(b, t)| *b += ct * t);
        }
    }

    /// The whole merged weight and bias for coefficients `c` (tests and batch-mode helpers).
    pub fn merged(&self, c: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut w = vec![0.0; self.out_features * self.in_features];
        let mut b = vec![0.0; self.out_features];
        self.merge_rows(c, 0..self.out_features, &mut w, &mut b);
        (w, b)
    }
}

/// Output rows per block: the T+1 source blocks fit in about 1 MiB.
fn block_rows(experts: usize, in_features: usize, out_features: usize) -> usize {
    let rows = (1 << 20) / ((experts + 1) * in_features * 4);
    rows.clamp(4, 64).min(out_features)
}

/// `x` is `[groups · rows_per_group, in]` (row-major), `coefficients` `[groups, T]`; returns
/// `[groups · rows_per_group, out]`.
pub fn expert_linear(
    x: &[f32],
    groups: usize,
    rows_per_group: usize,
    coefficients: &[f32],
    w: &ExpertLinearRef,
) -> Result<Vec<f32>> {
    let (k, o, t) = (w.in_features, w.out_features, w.experts());
    ensure!(x.len() == groups * rows_per_group * k, "expert_linear: input does not hold {groups}×{rows_per_group}×{k}");
    ensure!(coefficients.len() == groups * t, "expert_linear: coefficients are not [{groups}, {t}]");
    let rb = block_rows(t, k, o);
    let blocks: Vec<std::ops::Range<usize>> = (0..o).step_by(rb).map(|s| s..(s + rb).min(o)).collect();
    // Each block: [groups, rows_per_group, block width].
    let parts: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|rows| -> Result<Vec<f32>> {
            let width = rows.len();
            let mut tile = vec![0.0f32; width * k];
            let mut bias = vec![0.0f32; width];
            let mut part = vec![0.0f32; groups * rows_per_group * width];
            for (g, out) in part.chunks_exact_mut(rows_per_group * width).enumerate() {
                w.merge_rows(&coefficients[g * t..(g + 1) * t], rows.clone(), &mut tile, &mut bias);
                for row in out.chunks_exact_mut(width) {
                    row.copy_from_slice(&bias);
                }
                let xg =
                    MatRef::row_major(&x[g * rows_per_group * k..(g + 1) * rows_per_group * k], rows_per_group, k)?;
                matmul(xg, MatRef::row_major(&tile, width, k)?.t(), out, true, Threads::Single)?;
            }
            Ok(part)
        })
        .collect::<Result<_>>()?;
    let mut y = vec![0.0f32; groups * rows_per_group * o];
    for (rows, part) in blocks.iter().zip(&parts) {
        for (dst, src) in y.chunks_exact_mut(o).zip(part.chunks_exact(rows.len())) {
            dst[rows.clone()].copy_from_slice(src);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd shapes: 3 groups of 5 rows, 13 inputs, 71 outputs (several blocks and a ragged last one), 3 experts.
    #[test]
    fn matches_merging_then_multiplying_in_f64() {
        let (g, n, k, o, t) = (3, 5, 13, 71, 3);
        let v =
            |len: usize, s: usize| (0..len).map(|i| (((i + s) * 7919) % 211) as f32 / 105.0 - 1.0).collect::<Vec<_>>();
        let (base_w, base_b) = (v(o * k, 1), v(o, 2));
        let tw: Vec<Vec<f32>> = (0..t).map(|i| v(o * k, 10 + i)).collect();
        let tb: Vec<Vec<f32>> = (0..t).map(|i| v(o, 20 + i)).collect();
        let w = ExpertLinearRef {
            base_weight: &base_w,
            base_bias: &base_b,
            task_weights: tw.iter().map(Vec::as_slice).collect(),
            task_biases: tb.iter().map(Vec::as_slice).collect(),
            out_features: o,
            in_features: k,
        };
        let x = v(g * n * k, 3);
        let c = v(g * t, 4);
        let y = expert_linear(&x, g, n, &c, &w).unwrap();
        for gi in 0..g {
            for r in 0..n {
                for j in 0..o {
                    let mut want = 0.0f64;
                    for kk in 0..k {
                        let mut wv = base_w[j * k + kk] as f64;
                        for ti in 0..t {
                            wv += c[gi * t + ti] as f64 * tw[ti][j * k + kk] as f64;
                        }
                        want += x[(gi * n + r) * k + kk] as f64 * wv;
                    }
                    want += base_b[j] as f64 + (0..t).map(|ti| c[gi * t + ti] as f64 * tb[ti][j] as f64).sum::<f64>();
                    let got = y[(gi * n + r) * o + j] as f64;
                    assert!((got - want).abs() < 1e-4, "group {gi} row {r} col {j}: {got} vs {want}");
                }
            }
        }
    }
}
