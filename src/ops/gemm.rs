//! Dense f32 matrix products on the CPU, through the `gemm` crate (packed, cache-blocked,
//! AVX-512/AVX2 micro-kernels, rayon-parallel).

use anyhow::{ensure, Result};
use rayon::prelude::*;

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

    /// Copies row `i`'s elements `cols` into `out` (`cols.len()` long): a slice copy where the row is
    /// contiguous, a gather where the view is transposed. Panics outside the view.
    pub(crate) fn copy_row_into(&self, i: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
        assert!(i < self.rows && cols.end <= self.cols && out.len() == cols.len(), "copy_row_into: outside the view");
        let start = i * self.row_stride + cols.start * self.col_stride;
        if self.col_stride == 1 {
            out.copy_from_slice(&self.data[start..start + out.len()]);
        } else {
            out.iter_mut().enumerate().for_each(|(j, o)| *o = self.data[start + j * self.col_stride]);
        }
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
    // SAFETY: MatRef's constructors proved every (i, j) of a and b lies inside its slice, and c holds
    // exactly m×n initialised elements.
    unsafe { gemm_raw(a, b, c.as_mut_ptr(), accumulate, threads) };
    Ok(())
}

/// The `gemm` crate's product `c (+)= a · b` into `c`, row-major `a.rows × b.cols` with row stride `b.cols`.
///
/// # Safety
/// Every (i, j) of `a` and `b` must lie inside its slice (what `MatRef`'s constructors prove), the inner
/// dimensions must agree and be non-zero, and `c` must be valid for `a.rows × b.cols` writes, and initialised
/// when `accumulate`.
unsafe fn gemm_raw(a: MatRef, b: MatRef, c: *mut f32, accumulate: bool, threads: Threads) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let parallelism = match threads {
        Threads::Single => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    gemm::gemm(
        m,
        n,
        k,
        c,
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

/// `y = x · w + bias` for `x` `[m, k]` and the right-hand side `w` viewed as `k × n`; returns `[m, n]`.
pub fn linear(x: &[f32], m: usize, k: usize, w: MatRef, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    ensure!(w.rows == k, "linear: weight view {}×{} does not take {k} inputs", w.rows, w.cols);
    let n = w.cols;
    let x = MatRef::row_major(x, m, k)?;
    let Some(b) = bias else { return product(x, w) };
    ensure!(b.len() == n, "linear: bias has {} elements, {n} needed", b.len());
    // The bias rows written in parallel, then the product added onto them. Filled on one thread, they cost
    // 2–3 ms of each 55 ms WEMoE call of a 64-image B/32 `embed` (BENCHMARKS.md).
    let mut y = Vec::with_capacity(m * n);
    y.spare_capacity_mut()[..m * n].par_chunks_mut(n).for_each(|row| {
        row.iter_mut().zip(b).for_each(|(o, &v)| {
            o.write(v);
        })
    });
    // SAFETY: the loop above wrote every one of the m rows of n elements.
    unsafe { y.set_len(m * n) };
    matmul(x, w, &mut y, true, Threads::All)?;
    Ok(y)
}

/// `a · b` into a new vector, written by the product alone: not zeroed first, which for the large outputs
/// here was a pass over memory of its own (glibc's `calloc` clears reused memory).
pub fn product(a: MatRef, b: MatRef) -> Result<Vec<f32>> {
    let (m, n) = (a.rows, b.cols);
    ensure!(b.rows == a.cols, "product: inner dimensions differ ({m}×{} · {}×{n})", a.cols, b.rows);
    if m == 0 || n == 0 || a.cols == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let mut c = Vec::<f32>::with_capacity(m * n);
    // SAFETY: as in `matmul`, with `c`'s m×n elements of capacity as the output. With `read_dst` false the
    // `gemm` crate sets its alpha to zero, and every kernel it has for these features (x86 micro-kernels,
    // gemv, gevv; 0.19) then stores `beta·acc` without reading the destination: all m×n are written before
    // `set_len`, none read.
    unsafe {
        gemm_raw(a, b, c.as_mut_ptr(), false, Threads::All);
        c.set_len(m * n);
    }
    Ok(c)
}

/// Backward of [`linear`] with respect to its input: `dx = dy · wᵀ` for `dy` `[m, n]` and the same
/// right-hand side view `w` (`k × n`) as the forward; returns `[m, k]`.
pub fn linear_backward_input(dy: &[f32], m: usize, w: MatRef) -> Result<Vec<f32>> {
    product(MatRef::row_major(dy, m, w.cols)?, w.t())
}

/// Backward of [`linear`] with respect to the weight and bias, in PyTorch's layout: `dw = dyᵀ · x` `[n, k]`
/// and `db = Σ_rows dy` `[n]`, for `x` `[m, k]` and `dy` `[m, n]` (a trainable router layer's gradients).
pub fn linear_backward_weight(x: &[f32], dy: &[f32], m: usize, k: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let dw = product(MatRef::row_major(dy, m, n)?.t(), MatRef::row_major(x, m, k)?)?;
    let mut db = vec![0.0f64; n];
    for row in dy.chunks_exact(n) {
        db.iter_mut().zip(row).for_each(|(d, &g)| *d += g as f64);
    }
    Ok((dw, db.into_iter().map(|v| v as f32).collect()))
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

    #[test]
    fn linear_backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (m, k, n) = (3, 5, 4);
        let (x, w, b, g) = (values(m * k, 1), values(n * k, 2), values(n, 3), values(m * n, 4));
        // loss = Σ g ∘ (x · wᵀ + b), in f64.
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            (0..m)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .map(|(i, j)| g[i * n + j] as f64 * (b[j] + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>()))
                .sum()
        };
        let (xf, wf, bf) = (f64s(&x), f64s(&w), f64s(&b));
        let view = MatRef::row_major(&w, n, k).unwrap().t();
        let dx = linear_backward_input(&g, m, view).unwrap();
        assert_gradient("dx", &dx, &numeric_gradient(&|v| loss(v, &wf, &bf), &xf), 1e-6);
        let (dw, db) = linear_backward_weight(&x, &g, m, k, n).unwrap();
        assert_gradient("dw", &dw, &numeric_gradient(&|v| loss(&xf, v, &bf), &wf), 1e-6);
        assert_gradient("db", &db, &numeric_gradient(&|v| loss(&xf, &wf, v), &bf), 1e-6);
    }
}
