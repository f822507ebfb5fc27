//! The adaptation loss: the batch-mean Shannon entropy of softmax(logits), and its gradient.

use rayon::prelude::*;

/// Mean over rows of `H(softmax(row))` for `[rows, classes]` logits, in f64, with PyTorch's log-softmax.
/// The rows' entropies are computed in parallel and summed in row order: rayon's own `sum` would add them
/// in a tree shaped by the thread count and by work stealing, and the loss would change in its last bits
/// from one machine to another.
pub fn softmax_entropy(logits: &[f32], classes: usize) -> f64 {
    let rows = logits.len() / classes;
    let entropies: Vec<f64> = logits.par_chunks(classes).map(|row| row_entropy(row).0).collect();
    entropies.iter().sum::<f64>() / rows as f64
}

/// The entropy of one row and its log-probabilities.
fn row_entropy(row: &[f32]) -> (f64, Vec<f64>) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let logp: Vec<f64> = row.iter().map(|&v| v as f64 - max - z.ln()).collect();
    (-logp.iter().map(|l| l.exp() * l).sum::<f64>(), logp)
}

/// Gradient of [`softmax_entropy`]: `−p∘(log p + H) / rows` per row.
pub fn softmax_entropy_backward(logits: &[f32], classes: usize) -> Vec<f32> {
    let rows = logits.len() / classes;
    let mut d = vec![0.0f32; logits.len()];
    d.par_chunks_mut(classes).zip(logits.par_chunks(classes)).for_each(|(out, row)| {
        let (h, logp) = row_entropy(row);
        out.iter_mut().zip(&logp).for_each(|(o, l)| *o = (-l.exp() * (l + h) / rows as f64) as f32);
    });
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn entropy_is_right_and_its_gradient_matches_finite_differences() {
        // Uniform logits: entropy ln(C).
        assert!((softmax_entropy(&[0.3; 5], 5) - 5f64.ln()).abs() < 1e-12);
        let (rows, classes) = (3, 5);
        let logits: Vec<f32> = values(rows * classes, 1).iter().map(|v| v * 3.0).collect();
        let loss = |l: &[f64]| -> f64 {
            l.chunks(classes)
                .map(|r| {
                    let z: f64 = r.iter().map(|x| x.exp()).sum();
                    -r.iter().map(|x| (x.exp() / z) * (x.exp() / z).ln()).sum::<f64>()
                })
                .sum::<f64>()
                / rows as f64
        };
        assert_gradient(
            "dlogits",
            &softmax_entropy_backward(&logits, classes),
            &numeric_gradient(&loss, &f64s(&logits)),
            1e-6,
        );
    }

    #[test]
    fn the_mean_adds_the_rows_in_order_whatever_the_thread_count() {
        let (rows, classes) = (1000, 7);
        let logits: Vec<f32> = values(rows * classes, 3).iter().map(|v| v * 5.0).collect();
        let in_order = logits.chunks(classes).map(|row| row_entropy(row).0).sum::<f64>() / rows as f64;
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mean = pool.install(|| softmax_entropy(&logits, classes));
            assert_eq!(mean.to_bits(), in_order.to_bits(), "{threads} threads: {mean} against {in_order}");
        }
    }
}
