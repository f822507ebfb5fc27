//! Row-wise helpers: token selection, L2 normalisation, scaling, addition.

use rayon::prelude::*;

/// Token `index` of each sample of `[batch, tokens, width]`.
pub fn select_token(x: &[f32], tokens: usize, width: usize, index: usize) -> Vec<f32> {
    x.chunks_exact(tokens * width).flat_map(|s| s[index * width..][..width].iter().copied()).collect()
}

/// Each row divided by its L2 norm; a zero row stays zero (PyTorch's `F.normalize` clamps the norm).
pub fn l2_normalize(x: &[f32], width: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(width).for_each(|row| {
        let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
    });
    y
}

/// `a += b`, element-wise.
pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(16 * 1024).zip(b.par_chunks(16 * 1024)).for_each(|(x, y)| {
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    });
}
