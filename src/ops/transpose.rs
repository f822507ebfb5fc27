//! Matrix transposition in cache-sized tiles.

use rayon::prelude::*;

/// `[rows, cols]` to `[cols, rows]`, row-major.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    assert_eq!(x.len(), rows * cols, "transpose: {} values for a {rows}×{cols} matrix", x.len());
    if rows == 0 || cols == 0 {
        return Vec::new(); // and no chunks of zero rows to split the output into
    }
    let mut y = vec![0.0f32; rows * cols];
    // Each task fills TILE output rows (= input columns), reading the input in TILE×TILE blocks.
    y.par_chunks_mut(TILE * rows).enumerate().for_each(|(block, out)| {
        let c0 = block * TILE;
        let cn = (cols - c0).min(TILE);
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in 0..cn {
                    out[c * rows + r] = x[r * cols + c0 + c];
                }
            }
        }
    });
    y
}

#[cfg(test)]
mod tests {
    #[test]
    fn transposes_empty_matrices() {
        assert!(super::transpose(&[], 0, 7).is_empty());
        assert!(super::transpose(&[], 7, 0).is_empty());
    }

    #[test]
    fn transposes_odd_shapes() {
        let (r, c) = (45, 71);
        let x: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
        let y = super::transpose(&x, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(y[j * r + i], x[i * c + j]);
            }
        }
    }
}
