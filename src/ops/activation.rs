//! Element-wise activations.

use rayon::prelude::*;

use crate::device::Activation;

/// The activation of one value.
pub fn activate(z: f32, act: Activation) -> f32 {
    match act {
        Activation::QuickGelu => z / (1.0 + (-1.702 * z).exp()),
        Activation::Gelu => 0.5 * z * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            0.5 * z * (1.0 + (C * (z + 0.044715 * z * z * z)).tanh())
        }
        Activation::Relu => z.max(0.0),
    }
}

/// The activation of every element.
pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    x.par_iter().with_min_len(4096).map(|&z| activate(z, act)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Values from torch: quick_gelu(1) = 1*sigmoid(1.702), gelu(1) = 0.8413447, gelu_tanh(1) = 0.841192007
        assert!((activate(1.0, Activation::QuickGelu) - 0.845_795_75).abs() < 1e-6);
        assert!((activate(1.0, Activation::Gelu) - 0.841_344_7).abs() < 1e-6);
        assert!((activate(-2.0, Activation::Gelu) + 0.045_500_26).abs() < 1e-6);
        assert!((activate(1.0, Activation::GeluTanh) - 0.841_192).abs() < 1e-6);
        assert_eq!(activate(-3.0, Activation::Relu), 0.0);
    }
}
