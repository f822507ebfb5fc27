//! Adam, as `torch.optim.Adam` computes it (no weight decay, no amsgrad).

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};

/// Adam's hyper-parameters and per-parameter moments.
#[derive(Clone, Debug)]
pub struct Adam {
    /// Learning rate.
    pub lr: f64,
    /// β1, β2.
    pub betas: (f64, f64),
    /// ε added to the denominator.
    pub eps: f64,
    /// Steps taken.
    pub step: u64,
    /// First and second moments, by parameter name.
    pub moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

impl Adam {
    /// A fresh optimiser.
    pub fn new(lr: f64, betas: (f64, f64), eps: f64) -> Self {
        Adam { lr, betas, eps, step: 0, moments: BTreeMap::new() }
    }

    /// One step over every parameter with a gradient, at learning rate `lr` (for schedules).
    pub fn update(
        &mut self,
        params: &mut BTreeMap<String, Vec<f32>>,
        grads: &BTreeMap<String, Vec<f32>>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let (b1, b2) = self.betas;
        let t = self.step as i32;
        // torch: step_size = lr / (1 − β1^t); denom = √v / √(1 − β2^t) + ε.
        let step_size = lr / (1.0 - b1.powi(t));
        let correction2 = (1.0 - b2.powi(t)).sqrt();
        for (name, g) in grads {
            let p = params.get_mut(name).with_context(|| format!("gradient for unknown parameter '{name}'"))?;
            ensure!(p.len() == g.len(), "parameter '{name}' has {} values, its gradient {}", p.len(), g.len());
            let (m, v) = self.moments.entry(name.clone()).or_insert_with(|| (vec![0.0; g.len()], vec![0.0; g.len()]));
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let (g, mm, vv) = (g as f64, *m as f64, *v as f64);
                let mm = b1 * mm + (1.0 - b1) * g;
                let vv = b2 * vv + (1.0 - b2) * g * g;
                *m = mm as f32;
                *v = vv as f32;
                *p = (*p as f64 - step_size * mm / (vv.sqrt() / correction2 + self.eps)) as f32;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_parameter_by_about_lr_against_its_gradient() {
        let mut params = BTreeMap::from([("w".to_string(), vec![1.0f32, -2.0, 0.5])]);
        let grads = BTreeMap::from([("w".to_string(), vec![0.3f32, -4.0, 1e-3])]);
        let mut adam = Adam::new(0.1, (0.9, 0.999), 1e-8);
        adam.update(&mut params, &grads, 0.1).unwrap();
        // m̂ = g, v̂ = g²: the step is lr·g/(|g| + ε) = ±lr.
        let want = [0.9f32, -1.9, 0.4];
        for (p, w) in params["w"].iter().zip(want) {
            assert!((p - w).abs() < 1e-4, "{p} vs {w}");
        }
        assert!(adam.update(&mut params, &BTreeMap::from([("x".to_string(), vec![1.0])]), 0.1).is_err());
    }
}
