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

/// Pillow's rounding of a fixed-point sum to 8 bits. Its sums are 32-bit: with 8-bit samples and weights
/// summing to one in 22 bits, the largest (a bicubic window's negative lobes included) stays below 2^31.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved 8-bit image `height × width × channels` (1 to 4) to `out_h × out_w`.
pub fn resize(
    src: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    out_h: usize,
    out_w: usize,
    filter: Filter,
) -> Vec<u8> {
    resize_window(src, (height, width, channels), (out_h, out_w), (0..out_h, 0..out_w), filter)
}

/// The output rows `rows` and columns `cols` of [`resize`]'s result (a centre crop's window), each pixel
/// equal to the full resize's: only the input rows the window's rows read are resampled horizontally, and
/// only its columns are computed (as Pillow computes a resize's box).
pub fn resize_window(
    src: &[u8],
    (height, width, channels): (usize, usize, usize),
    (out_h, out_w): (usize, usize),
    (rows, cols): (std::ops::Range<usize>, std::ops::Range<usize>),
    filter: Filter,
) -> Vec<u8> {
    assert!((1..=4).contains(&channels), "resize: {channels} channels");
    assert_eq!(src.len(), height * width * channels, "resize: {height}×{width}×{channels} image");
    assert!(rows.end <= out_h && cols.end <= out_w, "resize: window outside {out_h}×{out_w}");
    // The vertical pass's windows, and the input rows they read.
    let vertical = (out_h != height).then(|| Coefficients::new(height, out_h, filter));
    let needed = match &vertical {
        Some(v) if !rows.is_empty() => {
            let first = v.windows[rows.start].0;
            let (last_min, last) = &v.windows[rows.end - 1];
            first..last_min + last.len()
        }
        Some(_) => 0..0,
        None => rows.clone(),
    };
    // Horizontal pass over the needed rows, skipped when the width does not change (as Pillow does). It runs
    // on the transposed rows, so that each output column is a weighted sum of whole input columns (the
    // integer sums are exact in any order, so the result is Pillow's).
    let stride = cols.len() * channels;
    let selected = &src[needed.start * width * channels..needed.end * width * channels];
    let horizontal = if out_w != width {
        let by_column = transpose_pixels(selected, needed.len(), width, channels);
        let line = needed.len() * channels;
        let coeffs = Coefficients::new(width, out_w, filter);
        let mut resampled = vec![0u8; cols.len() * line];
        resample_lines(|x| &by_column[x * line..][..line], &coeffs.windows[cols.clone()], line, &mut resampled);
        transpose_pixels(&resampled, cols.len(), needed.len(), channels)
    } else {
        selected
            .chunks_exact(width * channels)
            .flat_map(|row| &row[cols.start * channels..cols.end * channels])
            .copied()
            .collect()
    };
    let Some(vertical) = vertical else { return horizontal };
    let mut out = vec![0u8; rows.len() * stride];
    let first = needed.start;
    resample_lines(|y| &horizontal[(y - first) * stride..][..stride], &vertical.windows[rows], stride, &mut out);
    out
}

/// Half of the fixed-point one: each sum starts there, so the shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// For each window, the weighted sum of the lines it covers (`line(i)` being line i, `len` bytes), rounded
/// to 8 bits, into consecutive lines of `out`: one axis of the resampling, vectorised along the lines.
fn resample_lines<'a>(line: impl Fn(usize) -> &'a [u8], windows: &[(usize, Vec<i32>)], len: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (its 8-lane 32-bit multiply; baseline x86-64 has none).
        return unsafe { resample_lines_avx2(line, windows, len, out) };
    }
    resample_lines_any(line, windows, len, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resample_lines_avx2<'a>(
    line: impl Fn(usize) -> &'a [u8],
    windows: &[(usize, Vec<i32>)],
    len: usize,
    out: &mut [u8],
) {
    resample_lines_any(line, windows, len, out)
}

#[inline(always)]
fn resample_lines_any<'a>(line: impl Fn(usize) -> &'a [u8], windows: &[(usize, Vec<i32>)], len: usize, out: &mut [u8]) {
    if len == 0 {
        return;
    }
    let mut acc = vec![0i32; len];
    for ((first, k), out_line) in windows.iter().zip(out.chunks_exact_mut(len)) {
        acc.fill(HALF);
        for (j, &w) in k.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(line(first + j)) {
                *a += i32::from(v) * w;
            }
        }
        for (o, &a) in out_line.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// `[rows][cols][channels]` bytes as `[cols][rows][channels]`.
fn transpose_pixels(src: &[u8], rows: usize, cols: usize, channels: usize) -> Vec<u8> {
    match channels {
        1 => transpose::<1>(src, rows, cols),
        2 => transpose::<2>(src, rows, cols),
        3 => transpose::<3>(src, rows, cols),
        _ => transpose::<4>(src, rows, cols),
    }
}

fn transpose<const C: usize>(src: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    if src.is_empty() {
        return out;
    }
    for (y, row) in src.chunks_exact(cols * C).enumerate() {
        for (x, px) in row.chunks_exact(C).enumerate() {
            let at = (x * rows + y) * C;
            out[at..at + C].copy_from_slice(px);
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

    /// The two passes written plainly, pixel by pixel, in 64-bit sums: the oracle of the vectorised ones.
    fn plain_resize(src: &[u8], (h, w, c): (usize, usize, usize), (oh, ow): (usize, usize), f: Filter) -> Vec<u8> {
        let half = 1i64 << (PRECISION_BITS - 1);
        let round = |acc: i64| (acc >> PRECISION_BITS).clamp(0, 255) as u8;
        let horizontal: Vec<u8> = if ow != w {
            let k = Coefficients::new(w, ow, f);
            (0..h * ow * c)
                .map(|i| {
                    let (y, x, ch) = (i / (ow * c), i / c % ow, i % c);
                    let (xmin, ws) = &k.windows[x];
                    round(
                        ws.iter()
                            .enumerate()
                            .fold(half, |a, (t, &wt)| a + i64::from(src[(y * w + xmin + t) * c + ch]) * i64::from(wt)),
                    )
                })
                .collect()
        } else {
            src.to_vec()
        };
        if oh == h {
            return horizontal;
        }
        let k = Coefficients::new(h, oh, f);
        (0..oh * ow * c)
            .map(|i| {
                let (y, rest) = (i / (ow * c), i % (ow * c));
                let (ymin, ws) = &k.windows[y];
                round(
                    ws.iter().enumerate().fold(half, |a, (t, &wt)| {
                        a + i64::from(horizontal[(ymin + t) * ow * c + rest]) * i64::from(wt)
                    }),
                )
            })
            .collect()
    }

    #[test]
    fn every_window_equals_the_plain_resize() {
        let mut seed = 7u64;
        let mut byte = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        };
        for (h, w, oh, ow) in [(37, 53, 24, 30), (20, 17, 45, 33), (61, 40, 61, 23), (9, 64, 31, 64), (5, 5, 1, 3)] {
            for c in 1..=4 {
                let img: Vec<u8> = (0..h * w * c).map(|_| byte()).collect();
                for f in [Filter::Bicubic, Filter::Bilinear] {
                    let want = plain_resize(&img, (h, w, c), (oh, ow), f);
                    assert_eq!(resize(&img, h, w, c, oh, ow, f), want, "{h}×{w}×{c} -> {oh}×{ow} {f:?}");
                    for (rows, cols) in [(oh / 3..oh - oh / 4, ow / 5..ow / 2 + 1), (0..oh, ow - 1..ow), (0..0, 0..ow)]
                    {
                        let got = resize_window(&img, (h, w, c), (oh, ow), (rows.clone(), cols.clone()), f);
                        let window: Vec<u8> = rows
                            .clone()
                            .flat_map(|y| want[(y * ow + cols.start) * c..(y * ow + cols.end) * c].to_vec())
                            .collect();
                        assert_eq!(got, window, "{h}×{w}×{c} -> {oh}×{ow} {f:?} rows {rows:?} cols {cols:?}");
                    }
                }
            }
        }
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
