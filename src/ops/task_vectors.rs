//! Layer-wise AdaMerging's two operations on task vectors: the merge `θ0 + Σ_t λ_t·τ_t` of one parameter
//! tensor, and the contraction `⟨τ_t, g⟩` of its gradient with each task vector (the coefficients' gradient).
//! The CPU backend's, and the reference of kernels/task_vectors.cu.

use rayon::prelude::*;

/// Values per parallel chunk.
const CHUNK: usize = 1 << 14;

/// `base + Σ_t lambdas[t]·tasks[t]`, the experts added in order, each product rounded before its sum, as
/// torch's `state_dict[name] + param * w` computes it (Rust never fuses the two into one fma).
pub fn merge_rounded(base: &[f32], tasks: &[&[f32]], lambdas: &[f32]) -> Vec<f32> {
    assert_eq!(
        tasks.len(),
        lambdas.len(),
        "merge_rounded: {} task vectors, {} coefficients",
        tasks.len(),
        lambdas.len()
    );
    let mut out = base.to_vec();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let at = c * CHUNK..c * CHUNK + out.len();
        for (tau, &lambda) in tasks.iter().zip(lambdas) {
            out.iter_mut().zip(&tau[at.clone()]).for_each(|(o, &v)| *o += v * lambda);
        }
    });
    out
}

/// `⟨tasks[t], g⟩` for every task vector, summed in f64 (chunks in parallel, added in a fixed order).
pub fn task_vector_dots(tasks: &[&[f32]], g: &[f32]) -> Vec<f32> {
    tasks
        .par_iter()
        .map(|tau| {
            assert_eq!(
                tau.len(),
                g.len(),
                "task_vector_dots: a task vector of {} values, a gradient of {}",
                tau.len(),
                g.len()
            );
            tau.par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .map(|(t, g)| t.iter().zip(g).map(|(&t, &g)| t as f64 * g as f64).sum::<f64>())
                .collect::<Vec<f64>>()
                .into_iter()
                .fold(0.0, |a, b| a + b) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_each_rounded_product_in_expert_order() {
        // 6e-8 is just over half an ulp of 1: added one at a time each rounds up (1 + 2ε), where their sum
        // first would give 1 + ε.
        let theta0 = [1.0f32, -0.0, 3.0];
        let taus = [[6e-8f32, 0.0, 1.0 + f32::EPSILON], [6e-8f32, -0.0, -2.0]];
        let got = merge_rounded(&theta0, &[&taus[0], &taus[1]], &[1.0, 1.0]);
        assert_eq!(got[0], 1.0 + 2.0 * f32::EPSILON);
        assert_eq!(got[1].to_bits(), 0.0f32.to_bits(), "-0 + 0 + -0 is +0, as torch gives");
        assert_eq!(got[2], (3.0 + (1.0 + f32::EPSILON)) - 2.0);
        // 1 + 0.3·(1 + 3ε): the product rounded first gives 1.3000002, a fused multiply-add 1.3000001.
        let v = 1.0 + 3.0 * f32::EPSILON;
        let got = merge_rounded(&[1.0], &[&[v]], &[0.3]);
        assert_eq!(got[0], 1.0 + v * 0.3);
        assert_ne!(got[0], v.mul_add(0.3, 1.0), "the case tells the two apart");
    }

    #[test]
    fn dots_are_summed_in_f64() {
        // 2^24 + 1 − 2^24 in f32 loses the 1; in f64 it stays. Over more than one chunk.
        let n = 3 * CHUNK + 5;
        let mut tau = vec![0.0f32; n];
        let mut g = vec![0.0f32; n];
        (tau[0], g[0]) = (16_777_216.0, 1.0);
        (tau[CHUNK + 1], g[CHUNK + 1]) = (1.0, 1.0);
        (tau[n - 1], g[n - 1]) = (-16_777_216.0, 1.0);
        let minus: Vec<f32> = tau.iter().map(|v| -2.0 * v).collect();
        assert_eq!(task_vector_dots(&[&tau, &minus], &g), vec![1.0, -2.0]);
    }
}
