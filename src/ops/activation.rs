//! Element-wise activations, computed in place.

use rayon::prelude::*;

use super::widest::widest;
use crate::device::Activation;

/// `e^x` for f32 without a libm call, so loops over it vectorise: Cephes' range reduction to
/// `[-ln2/2, ln2/2]` and degree-6 polynomial, then `2^n` built in the exponent bits. Relative error
/// below 3e-7 over the clamped range [-87, 88] (tested against f64).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    // n + 1.5·2^23 holds the integer n in its low mantissa bits (|n| < 2^22).
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from those bits, not from `n as i32`: Rust's float-to-int cast saturates and maps NaN to 0, which
    // the compiler does one lane at a time, and that conversion was most of the loop (BENCHMARKS.md).
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits((n_int.wrapping_add(127) << 23) as u32)
}

/// The activation of one value.
#[inline(always)]
pub fn activate(z: f32, act: Activation) -> f32 {
    match act {
        Activation::QuickGelu => z / (1.0 + exp_f32(-1.702 * z)),
        Activation::Gelu => 0.5 * z * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            0.5 * z * (1.0 + (C * (z + 0.044715 * z * z * z)).tanh())
        }
        Activation::Relu => z.max(0.0),
    }
}

/// Elements per parallel task of the element-wise loops.
const CHUNK: usize = 16 * 1024;

/// Applies the activation to every element in place.
pub fn activation_in_place(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(CHUNK).for_each(|chunk| activation_in_place_on_this_thread(chunk, act));
}

/// [`activation_in_place`] on the calling thread alone (for slices that a parallel loop already shares out).
pub fn activation_in_place_on_this_thread(x: &mut [f32], act: Activation) {
    // One monomorphic loop per activation, so each vectorises on its own, at the CPU's width.
    #[inline(always)]
    fn apply(x: &mut [f32], f: impl Fn(f32) -> f32) {
        widest(|| x.iter_mut().for_each(|v| *v = f(*v)))
    }
    match act {
        Activation::QuickGelu => apply(x, |z| activate(z, Activation::QuickGelu)),
        Activation::Gelu => apply(x, |z| activate(z, Activation::Gelu)),
        Activation::GeluTanh => apply(x, |z| activate(z, Activation::GeluTanh)),
        Activation::Relu => apply(x, |z| z.max(0.0)),
    }
}

/// The activation of every element of `x` into a new vector, `x` left as it is: one pass, where a copy
/// activated in place reads and writes every element twice (the tape keeps the pre-activation for the
/// backward). The same values as [`activation_in_place`].
pub fn activation(x: &[f32], act: Activation) -> Vec<f32> {
    fn apply(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        let mut y = Vec::with_capacity(x.len());
        y.spare_capacity_mut()[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(out, inp)| {
            widest(|| {
                out.iter_mut().zip(inp).for_each(|(o, &v)| {
                    o.write(f(v));
                })
            })
        });
        // SAFETY: the loop above wrote each of the first `x.len()` elements (the chunks cover them all).
        unsafe { y.set_len(x.len()) };
        y
    }
    match act {
        Activation::QuickGelu => apply(x, |z| activate(z, Activation::QuickGelu)),
        Activation::Gelu => apply(x, |z| activate(z, Activation::Gelu)),
        Activation::GeluTanh => apply(x, |z| activate(z, Activation::GeluTanh)),
        Activation::Relu => apply(x, |z| z.max(0.0)),
    }
}

/// The activation's derivative at `z`.
#[inline(always)]
pub fn derivative(z: f32, act: Activation) -> f32 {
    match act {
        Activation::QuickGelu => {
            let s = 1.0 / (1.0 + exp_f32(-1.702 * z));
            s + 1.702 * z * s * (1.0 - s)
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * z * z).exp() / (2.0 * std::f32::consts::PI).sqrt();
            cdf + z * pdf
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6;
            let u = C * (z + 0.044715 * z * z * z);
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * z * z)
        }
        Activation::Relu => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Backward of an activation: `dz = dy ∘ act'(z)` from the pre-activation `z`.
pub fn activation_backward(z: &[f32], dy: &[f32], act: Activation) -> Vec<f32> {
    // One monomorphic loop per activation over chunks, as in `activation_in_place`, so each vectorises.
    // Written once, not zeroed first (a pass over memory of its own).
    fn apply(z: &[f32], dy: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        assert_eq!(z.len(), dy.len(), "activation_backward: the input and its gradient differ in length");
        let mut dz = Vec::with_capacity(z.len());
        dz.spare_capacity_mut()[..z.len()]
            .par_chunks_mut(CHUNK)
            .zip(z.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(out, (z, g))| {
                widest(|| {
                    out.iter_mut().zip(z).zip(g).for_each(|((o, &z), &g)| {
                        o.write(g * f(z));
                    })
                })
            });
        // SAFETY: the chunks cover the first `z.len()` elements and the loop wrote each of them.
        unsafe { dz.set_len(z.len()) };
        dz
    }
    match act {
        Activation::QuickGelu => apply(z, dy, |z| {
            let s = 1.0 / (1.0 + exp_f32(-1.702 * z));
            s + 1.702 * z * s * (1.0 - s)
        }),
        Activation::Relu => apply(z, dy, |z| if z > 0.0 { 1.0 } else { 0.0 }),
        Activation::Gelu => apply(z, dy, |z| derivative(z, Activation::Gelu)),
        Activation::GeluTanh => apply(z, dy, |z| derivative(z, Activation::GeluTanh)),
    }
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
        assert!(activate(-200.0, Activation::QuickGelu).abs() < 1e-30);
        assert_eq!(activate(200.0, Activation::QuickGelu), 200.0);
    }

    #[test]
    fn out_of_place_equals_in_place() {
        // Past one parallel chunk, with a ragged end.
        let x: Vec<f32> = (0..CHUNK * 2 + 37).map(|i| ((i % 997) as f32 - 498.0) / 61.0).collect();
        for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let mut want = x.clone();
            activation_in_place(&mut want, act);
            let got = activation(&x, act);
            assert_eq!(got.len(), x.len());
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{act:?}: the out-of-place values differ");
        }
    }

    /// The loops run compiled for the CPU's widest vectors (`widest`); each element must still be the bits of
    /// the one-value definitions, special values included.
    #[test]
    fn vector_loops_give_the_scalar_definitions_bits() {
        let mut z: Vec<f32> = (0..CHUNK + 45).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 37.0).collect();
        z.extend([0.0, -0.0, 1e-40, -1e-40, 87.5, -87.5, 200.0, -200.0, f32::MAX, f32::MIN, f32::INFINITY]);
        z.extend([f32::NEG_INFINITY, f32::NAN]);
        let dy: Vec<f32> = (0..z.len()).map(|i| ((i * 104729 % 211) as f32 - 105.0) / 50.0).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            // One value at a time through `black_box`, so no loop is vectorised on this side.
            let scalar = |f: &dyn Fn(f32, f32) -> f32| -> Vec<f32> {
                z.iter().zip(&dy).map(|(&v, &g)| f(std::hint::black_box(v), g)).collect()
            };
            let want = scalar(&|v, _| activate(v, act));
            let mut in_place = z.clone();
            activation_in_place(&mut in_place, act);
            assert_eq!(bits(&in_place), bits(&want), "{act:?}: in place");
            assert_eq!(bits(&activation(&z, act)), bits(&want), "{act:?}: out of place");
            let want_dz = scalar(&|v, g| g * derivative(v, act));
            assert_eq!(bits(&activation_backward(&z, &dy, act)), bits(&want_dz), "{act:?}: backward");
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_its_range() {
        let mut worst = 0.0f64;
        for i in 0..350_000 {
            let x = -87.0 + i as f32 * 0.0005; // up to 87.9995, inside the clamp
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn derivatives_match_finite_differences() {
        use crate::ops::gradcheck::*;
        let z: Vec<f32> = values(40, 5).iter().map(|v| v * 4.0 + 0.013).collect();
        let g = values(40, 6);
        let g = &g;
        let forward = |act: Activation| {
            move |z: &[f64]| -> f64 {
                z.iter()
                    .zip(g)
                    .map(|(&z, &g)| {
                        let a = match act {
                            Activation::QuickGelu => z / (1.0 + (-1.702 * z).exp()),
                            Activation::Gelu => 0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2)),
                            Activation::GeluTanh => {
                                let c = (2.0 / std::f64::consts::PI).sqrt();
                                0.5 * z * (1.0 + (c * (z + 0.044715 * z * z * z)).tanh())
                            }
                            Activation::Relu => z.max(0.0),
                        };
                        g as f64 * a
                    })
                    .sum()
            }
        };
        for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let f = forward(act);
            assert_gradient(
                &format!("{act:?}"),
                &activation_backward(&z, g, act),
                &numeric_gradient(&f, &f64s(&z)),
                1e-5,
            );
        }
    }
}
