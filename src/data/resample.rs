//! Pillow's separable resampling of 8-bit images, reproduced exactly: the same filter supports scaled
//! by the reduction factor (antialiasing), the same 22-bit fixed-point coefficients and rounding, and
//! the horizontal pass rounded to 8 bits before the vertical one. CLIP's preprocessing resizes with it.

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A resampling filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle filter, support 1 (PIL `BILINEAR`, 2).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (PIL `BICUBIC`, 3).
    Bicubic,
}

impl Filter {
    /// The filter for Pillow's numeric `resample` code.
    pub fn from_pil(code: i64) -> Option<Self> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// For each output position: the first input index and the fixed-point weights of its window.
struct Coefficients {
    windows: Vec<(usize, Vec<i32>)>,
}

impl Coefficients {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let windows = (0..out_size)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                // C's (int) cast truncates toward zero.
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let weights: Vec<f64> =
                    (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) / filterscale)).collect();
                let total: f64 = weights.iter().sum();
                let one = (1u64 << PRECISION_BITS) as f64;
                let fixed = weights
                    .iter()
                    .map(|w| {
                        let w = if total != 0.0 { w / total } else { *w };
                        if w < 0.0 {
                            (-0.5 + w * one) as i32
                        } else {
                            (0.5 + w * one) as i32
                        }
                    })
                    .collect();
                (xmin, fixed)
            })
            .collect();
        Coefficients { windows }
    }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved 8-bit image `height × width × channels` to `out_h × out_w`.
pub fn resize(
    src: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    out_h: usize,
    out_w: usize,
    filter: Filter,
) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass, skipped when the width does not change (as Pillow does).
    let horizontal = if out_w != width {
        let coeffs = Coefficients::new(width, out_w, filter);
        let mut tmp = vec![0u8; height * out_w * channels];
        for y in 0..height {
            let row = &src[y * width * channels..][..width * channels];
            for (xx, (xmin, k)) in coeffs.windows.iter().enumerate() {
                for c in 0..channels {
                    let acc = k
                        .iter()
                        .enumerate()
                        .fold(half, |acc, (i, &w)| acc + row[(xmin + i) * channels + c] as i64 * w as i64);
                    tmp[(y * out_w + xx) * channels + c] = clip8(acc);
                }
            }
        }
        tmp
    } else {
        src.to_vec()
    };
    if out_h == height {
        return horizontal;
    }
    let coeffs = Coefficients::new(height, out_h, filter);
    let stride = out_w * channels;
    let mut out = vec![0u8; out_h * stride];
    for (yy, (ymin, k)) in coeffs.windows.iter().enumerate() {
        for i in 0..stride {
            let acc = k
                .iter()
                .enumerate()
                .fold(half, |acc, (j, &w)| acc + horizontal[(ymin + j) * stride + i] as i64 * w as i64);
            out[yy * stride + i] = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy_and_constants_stay_constant() {
        let img: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 13 % 256) as u8).collect();
        assert_eq!(resize(&img, 5, 7, 3, 5, 7, Filter::Bicubic), img);
        let flat = vec![77u8; 9 * 11];
        assert!(resize(&flat, 9, 11, 1, 4, 3, Filter::Bicubic).iter().all(|&v| v == 77));
        assert!(resize(&flat, 9, 11, 1, 20, 30, Filter::Bilinear).iter().all(|&v| v == 77));
    }

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 224), (224, 640), (37, 37), (1000, 3)] {
            for (_, k) in Coefficients::new(i, o, Filter::Bicubic).windows {
                let s: i64 = k.iter().map(|&w| w as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }
}
