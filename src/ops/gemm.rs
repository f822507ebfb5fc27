//! Dense f32 matrix products on the CPU, through the `gemm` crate (packed, cache-blocked,
//! AVX-512/AVX2 micro-kernels, rayon-parallel).

use anyhow::{ensure, Result};

/// A read-only strided matrix view over a slice: element `(i, j)` is `data[i*row_stride + j*col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix; fails when `data` is too short.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A matrix with explicit strides; fails when an element would fall outside `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            ensure!(
                last < data.len(),
                "matrix view {rows}×{cols} (strides {row_stride}, {col_stride}) exceeds {} elements",
                data.len()
            );
        }
        Ok(MatRef { data, rows, cols, row_stride, col_stride })
    }

    /// The transpose, as a view of the same elements.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread only (for products already inside a parallel loop).
    Single,
    /// Every thread of the rayon pool.
    All,
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` contiguous row-major `a.rows × b.cols`.
pub fn matmul(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool, threads: Threads) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    ensure!(b.rows == k, "matmul: inner dimensions differ ({m}×{k} · {}×{n})", b.rows);
    ensure!(c.len() == m * n, "matmul: output holds {} elements, {m}×{n} needed", c.len());
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = match threads {
        Threads::Single => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: MatRef's constructors proved every (i, j) of a and b lies inside its slice, and c holds
    // exactly m×n elements addressed with row stride n and column stride 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `y = x · w + bias` for `x` `[m, k]` and the right-hand side `w` viewed as `k × n`; returns `[m, n]`.
pub fn linear(x: &[f32], m: usize, k: usize, w: MatRef, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    ensure!(w.rows == k, "linear: weight view {}×{} does not take {k} inputs", w.rows, w.cols);
    let n = w.cols;
    let mut y = vec![0.0f32; m * n];
    if let Some(b) = bias {
        ensure!(b.len() == n, "linear: bias has {} elements, {n} needed", b.len());
        for row in y.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    matmul(MatRef::row_major(x, m, k)?, w, &mut y, bias.is_some(), Threads::All)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn linear_matches_naive_on_odd_shapes() {
        let (m, k, n) = (37, 29, 23);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
        let mut wt = vec![0.0; k * n];
        for j in 0..n {
            for p in 0..k {
                wt[p * n + j] = w[j * k + p];
            }
        }
        let want = naive(&x, &wt, m, k, n);
        let got = linear(&x, m, k, MatRef::row_major(&w, n, k).unwrap().t(), Some(&bias)).unwrap();
        let same = linear(&x, m, k, MatRef::row_major(&wt, k, n).unwrap(), Some(&bias)).unwrap();
        assert_eq!(got, same, "both layouts give the same product");
        for i in 0..m {
            for j in 0..n {
                let e = want[i * n + j] + bias[j];
                assert!((got[i * n + j] - e).abs() < 1e-4, "({i},{j}): {} vs {e}", got[i * n + j]);
            }
        }
    }

    #[test]
    fn out_of_bounds_views_are_refused() {
        let data = vec![0.0; 10];
        assert!(MatRef::row_major(&data, 3, 4).is_err());
        assert!(MatRef::strided(&data, 2, 5, 5, 1).is_ok());
    }
}
