//! CLIP's embeddings: patch convolution (kernel = stride = patch, no bias), class token, positions.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::{linear, MatRef};

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

/// `[B, C, S, S]` pixels to `[B, N, D]` tokens.
pub fn patch_embed(
    pixels: &[f32],
    weight: &[f32],
    class_embedding: &[f32],
    position_embedding: &[f32],
    g: PatchGeometry,
) -> Result<Vec<f32>> {
    let (c, s, p, d, grid) = (g.channels, g.image, g.patch, g.width, g.grid());
    let patch_len = c * p * p;
    let patches = grid * grid;
    ensure!(pixels.len() == g.batch * c * s * s, "patch_embed: pixel count does not match {g:?}");
    // im2col: one row per patch, in the (channel, row, column) order of the kernel.
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
    let kernel = MatRef::row_major(weight, d, patch_len)?.t();
    let embedded = linear(&cols, g.batch * patches, patch_len, kernel, None)?;
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
