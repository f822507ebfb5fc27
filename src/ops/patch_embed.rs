//! CLIP's embeddings: patch convolution (kernel = stride = patch, no bias), class token, positions.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::{linear, product, MatRef};

/// Shapes of a patch embedding.
#[derive(Clone, Copy, Debug)]
pub struct PatchGeometry {
    /// Samples.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// Image side in pixels.
    pub image: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Embedding width.
    pub width: usize,
}

impl PatchGeometry {
    /// Patches per side (PyTorch's convolution drops a remainder).
    pub fn grid(&self) -> usize {
        self.image / self.patch
    }

    /// Tokens per sample: the patches and the class token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// im2col: one row per patch, `[B·patches, C·P·P]`, in the (channel, row, column) order of the kernel.
fn im2col(pixels: &[f32], g: PatchGeometry) -> Result<Vec<f32>> {
    let (c, s, p, grid) = (g.channels, g.image, g.patch, g.grid());
    let (patch_len, patches) = (c * p * p, grid * grid);
    ensure!(pixels.len() == g.batch * c * s * s, "patch_embed: pixel count does not match {g:?}");
    let mut cols = vec![0.0f32; g.batch * patches * patch_len];
    cols.par_chunks_mut(patch_len).enumerate().for_each(|(row, dst)| {
        let (b, idx) = (row / patches, row % patches);
        let (py, px) = (idx / grid, idx % grid);
        for ch in 0..c {
            for ky in 0..p {
                let src = ((b * c + ch) * s + py * p + ky) * s + px * p;
                dst[(ch * p + ky) * p..][..p].copy_from_slice(&pixels[src..src + p]);
            }
        }
    });
    Ok(cols)
}

/// `[B, C, S, S]` pixels to `[B, N, D]` tokens.
pub fn patch_embed(
    pixels: &[f32],
    weight: &[f32],
    class_embedding: &[f32],
    position_embedding: &[f32],
    g: PatchGeometry,
) -> Result<Vec<f32>> {
    let (c, p, d, grid) = (g.channels, g.patch, g.width, g.grid());
    let patch_len = c * p * p;
    let patches = grid * grid;
    let cols = im2col(pixels, g)?;
    ensure!(weight.len() == d * patch_len, "patch_embed: the weight does not hold {d}×{patch_len} values");
    // The kernel `[D, C·P·P]` as `[C·P·P, D]`: the `gemm` crate multiplies by a row-major right-hand side
    // faster than by a transposed one at this depth (B/32: 73 against 93 ms, BENCHMARKS.md), by far more than
    // transposing 2.4 M values costs.
    let kernel = super::transpose::transpose(weight, d, patch_len);
    let embedded = linear(&cols, g.batch * patches, patch_len, MatRef::row_major(&kernel, patch_len, d)?, None)?;
    let tokens = g.tokens();
    let mut out = vec![0.0f32; g.batch * tokens * d];
    out.par_chunks_mut(tokens * d).enumerate().for_each(|(b, sample)| {
        for (t, tok) in sample.chunks_exact_mut(d).enumerate() {
            let src = if t == 0 { class_embedding } else { &embedded[(b * patches + t - 1) * d..][..d] };
            for ((o, &e), &pos) in tok.iter_mut().zip(src).zip(&position_embedding[t * d..]) {
                *o = e + pos;
            }
        }
    });
    Ok(out)
}

/// Backward of [`patch_embed`] with respect to its parameters, from the tokens' gradient `[B, N, D]`:
/// `(d weight [D, C·P·P], d class_embedding [D], d position_embedding [N, D])`, the sums over samples in
/// order in f64.
pub fn patch_embed_backward(
    pixels: &[f32],
    d_tokens: &[f32],
    g: PatchGeometry,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (d, tokens, patches) = (g.width, g.tokens(), g.grid() * g.grid());
    ensure!(
        d_tokens.len() == g.batch * tokens * d,
        "patch_embed_backward: {} gradients for {} samples of {tokens} tokens × {d}",
        d_tokens.len(),
        g.batch
    );
    let cols = im2col(pixels, g)?;
    let mut d_position = vec![0.0f64; tokens * d];
    for sample in d_tokens.chunks_exact(tokens * d) {
        d_position.iter_mut().zip(sample).for_each(|(a, &v)| *a += v as f64);
    }
    let d_class = d_position[..d].iter().map(|&v| v as f32).collect();
    // The patches' rows of the gradient, `[B·patches, D]`, then `dEᵀ · cols`.
    let d_patches: Vec<f32> = d_tokens.chunks_exact(tokens * d).flat_map(|s| s[d..].iter().copied()).collect();
    let d_weight = product(
        MatRef::row_major(&d_patches, g.batch * patches, d)?.t(),
        MatRef::row_major(&cols, g.batch * patches, g.channels * g.patch * g.patch)?,
    )?;
    Ok((d_weight, d_class, d_position.into_iter().map(|v| v as f32).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn parameter_gradients_match_finite_differences() {
        // 2 samples, 2 channels, 7-pixel images in 3-pixel patches (a remainder dropped), width 5.
        let g = PatchGeometry { batch: 2, channels: 2, image: 7, patch: 3, width: 5 };
        let (tokens, k) = (g.tokens(), g.channels * g.patch * g.patch);
        let pixels = values(g.batch * g.channels * g.image * g.image, 1);
        let (w, cls, pos) = (values(g.width * k, 2), values(g.width, 3), values(tokens * g.width, 4));
        let dy = values(g.batch * tokens * g.width, 5);
        let (nw, nc) = (w.len(), cls.len());
        // Σ dy∘patch_embed, in f64, as a function of (weight, class, position) laid end to end.
        let loss = |p: &[f64]| -> f64 {
            let cols = im2col(&pixels, g).unwrap();
            let mut total = 0.0;
            for b in 0..g.batch {
                for t in 0..tokens {
                    for o in 0..g.width {
                        let e = if t == 0 {
                            p[nw + o]
                        } else {
                            let row = &cols[(b * (tokens - 1) + t - 1) * k..][..k];
                            row.iter().zip(&p[o * k..(o + 1) * k]).map(|(&x, w)| x as f64 * w).sum()
                        };
                        total += dy[(b * tokens + t) * g.width + o] as f64 * (e + p[nw + nc + t * g.width + o]);
                    }
                }
            }
            total
        };
        let at: Vec<f64> = f64s(&w).into_iter().chain(f64s(&cls)).chain(f64s(&pos)).collect();
        let numeric = numeric_gradient(&loss, &at);
        let (dw, dc, dp) = patch_embed_backward(&pixels, &dy, g).unwrap();
        assert_gradient("d weight", &dw, &numeric[..nw], 1e-6);
        assert_gradient("d class", &dc, &numeric[nw..nw + nc], 1e-6);
        assert_gradient("d position", &dp, &numeric[nw + nc..], 1e-6);
        // The forward agrees with the f64 form at the point (the test's loss is the op's).
        let y = patch_embed(&pixels, &w, &cls, &pos, g).unwrap();
        let direct: f64 = y.iter().zip(&dy).map(|(&y, &g)| y as f64 * g as f64).sum();
        assert!((direct - loss(&at)).abs() < 1e-4, "{direct} against {}", loss(&at));
    }
}
