//! Times the engine's CPU GEMM on one shape; used by tools/bench_gemm_vs_torch.py for a side-by-side
//! run with PyTorch (criterion's `cargo bench` covers the same products for regressions).
//!
//! `gemm_probe M K N REPS LAYOUT` prints the median seconds of `[M,K]·[K,N]`, where LAYOUT is `nn`
//! (both row-major, like `a @ b`), `nt` (the right side stored `[N,K]`, like `F.linear`) or `bf16` (`nn` with
//! bf16 operands (`ops::bf16`: AMX or AVX-512 BF16), the right side packed in each product, as
//! `--precision bf16` runs it), `bf16x3` (f32 products emulated by three bf16 products: each operand split into
//! its bf16 rounding and the rest, `hi·hi + hi·lo + lo·hi` as one bf16 product over three times the inputs,
//! prepared in each product; it also prints to stderr how far the result is from the f32 product) or `tiles`
//! (`nn` on the WEMoE layer's tiles: `expert_linear` with one group and one task vector whose coefficient is zero,
//! so each tile's merge copies the weight's and the product is the dense one).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use wemoe_engine::ops::bf16;
use wemoe_engine::ops::expert_linear::{expert_linear, to_blocked, ExpertLinearRef};
use wemoe_engine::ops::gemm::{matmul, MatRef, Threads};

fn main() -> Result<()> {
    // As the command line runs: the bf16 product's fresh output reuses freed pages instead of faulting in new ones.
    wemoe_engine::heap::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [m, k, n, reps]: [usize; 4] = std::array::from_fn(|i| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(0));
    let layout = args.get(4).context("usage: gemm_probe M K N REPS nn|nt|bf16|bf16x3|tiles")?;
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0f32; m * n];
    let rhs = match layout.as_str() {
        "nn" | "bf16" | "bf16x3" | "tiles" => MatRef::row_major(&b, k, n)?,
        "nt" => MatRef::row_major(&b, n, k)?.t(),
        other => bail!("layout '{other}': expected nn, nt, bf16, bf16x3 or tiles"),
    };
    // The tiles' layout of the same `[K,N]` weight (blocked from PyTorch's `[N,K]`), a zero bias and a zero
    // task vector.
    let blocked =
        if layout == "tiles" { to_blocked(&wemoe_engine::ops::transpose::transpose(&b, k, n), n, k) } else { vec![] };
    let (zero_weight, zero_bias) = (vec![0.0f32; blocked.len()], vec![0.0f32; n]);
    let tiles = ExpertLinearRef {
        base_weight: &blocked,
        base_bias: &zero_bias,
        task_weights: vec![&zero_weight],
        task_biases: vec![&zero_bias],
        out_features: n,
        in_features: k,
    };
    let lhs = MatRef::row_major(&a, m, k)?;
    let mut product = || -> Result<()> {
        if layout == "bf16" {
            c = bf16::linear(&a, m, k, &bf16::pack_rhs(&b, k, n)?, None)?;
            return Ok(());
        }
        if layout == "bf16x3" {
            c = bf16x3(&a, &b, m, k, n)?;
            return Ok(());
        }
        if layout == "tiles" {
            c = expert_linear(&a, 1, m, &[0.0], &tiles)?;
            return Ok(());
        }
        matmul(lhs, rhs, &mut c, false, Threads::All)
    };
    for _ in 0..3 {
        product()?;
    }
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            product().map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    if layout == "bf16x3" {
        let mut exact = vec![0f32; m * n];
        matmul(lhs, rhs, &mut exact, false, Threads::All)?;
        let scale = exact.iter().fold(0f32, |s, v| s.max(v.abs()));
        let worst = exact.iter().zip(&c).fold(0f32, |s, (e, g)| s.max((e - g).abs()));
        eprintln!("max |bf16x3 - f32| / max |f32| = {:e}", worst / scale);
    }
    times.sort_by(f64::total_cmp);
    println!("{}", times[times.len() / 2]);
    Ok(())
}

/// `a·b` as three bf16 products: each operand split into its bf16 rounding and the rest (`x = hi + lo`), and
/// `hi·hi + hi·lo + lo·hi` computed as one product over three times the inputs.
fn bf16x3(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    let rest = |x: f32| x - half::bf16::from_f32(x).to_f32();
    let mut lhs = Vec::with_capacity(m * 3 * k);
    for row in a.chunks_exact(k) {
        lhs.extend_from_slice(row);
        lhs.extend_from_slice(row);
        lhs.extend(row.iter().map(|&x| rest(x)));
    }
    let mut rhs = Vec::with_capacity(3 * k * n);
    rhs.extend_from_slice(b);
    rhs.extend(b.iter().map(|&x| rest(x)));
    rhs.extend_from_slice(b);
    bf16::linear(&lhs, m, 3 * k, &bf16::pack_rhs(&rhs, 3 * k, n)?, None)
}
