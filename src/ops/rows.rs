//! Row-wise helpers: token selection, L2 normalisation, scaling, addition, and the split of rows into the
//! runs a micro-kernel takes.

use rayon::prelude::*;

/// `n` rows split as evenly as possible into runs of at most `most`, as `(first row, rows)`; the first
/// `n % runs` runs take one row more. A micro-kernel then computes no row it throws away (50 rows in runs of
/// at most 6: 5 × 6 + 4 × 5, not 8 × 6 + 2).
pub fn even_runs(n: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let runs = n.div_ceil(most);
    (0..runs).scan(0, move |start, run| {
        let rows = n / runs + usize::from(run < n % runs);
        let first = *start;
        *start += rows;
        Some((first, rows))
    })
}

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

/// Backward of [`l2_normalize`]: `dx = (dy − y·(y·dy)) / |x|` per row, with `y` the normalised row.
pub fn l2_normalize_backward(x: &[f32], width: usize, dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(width).zip(x.par_chunks(width).zip(dy.par_chunks(width))).for_each(|(out, (row, g))| {
        let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
        let dot = row.iter().zip(g).map(|(&y, &g)| y as f64 / norm * g as f64).sum::<f64>();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(g) {
            *o = ((g as f64 - v as f64 / norm * dot) / norm) as f32;
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn even_runs_cover_every_row_once_in_runs_differing_by_at_most_one() {
        for most in [6, 12] {
            assert_eq!(even_runs(0, most).count(), 0);
            for n in 1..40 {
                let runs: Vec<_> = even_runs(n, most).collect();
                assert_eq!(runs.len(), n.div_ceil(most), "{n} rows, runs of {most}");
                let mut next = 0;
                for &(start, rows) in &runs {
                    assert!(start == next && (1..=most).contains(&rows), "{n} rows: {runs:?}");
                    next += rows;
                }
                assert_eq!(next, n);
                let (short, long) = (runs.iter().map(|r| r.1).min().unwrap(), runs.iter().map(|r| r.1).max().unwrap());
                assert!(long - short <= 1, "{n} rows: {runs:?}");
            }
        }
    }

    #[test]
    fn l2_normalize_backward_matches_finite_differences() {
        let (rows, width) = (3, 6);
        let (x, g) = (values(rows * width, 1), values(rows * width, 2));
        let loss = |x: &[f64]| -> f64 {
            x.chunks(width)
                .zip(g.chunks(width))
                .map(|(r, g)| {
                    let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                    r.iter().zip(g).map(|(v, &g)| v / n * g as f64).sum::<f64>()
                })
                .sum()
        };
        assert_gradient("dx", &l2_normalize_backward(&x, width, &g), &numeric_gradient(&loss, &f64s(&x)), 1e-6);
    }
}
