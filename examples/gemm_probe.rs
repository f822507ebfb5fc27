//! Times the engine's CPU GEMM on one shape; used by tools/bench_gemm_vs_torch.py for a side-by-side
//! run with PyTorch (criterion's `cargo bench` covers the same products for regressions).
//!
//! `gemm_probe M K N REPS LAYOUT` prints the median seconds of `[M,K]·[K,N]`, where LAYOUT is `nn`
//! (both row-major, like `a @ b`), `nt` (the right side stored `[N,K]`, like `F.linear`) or `bf16` (`nn` with
//! bf16 operands (`ops::bf16`: AMX or AVX-512 BF16), the right side packed in each product, as
//! `--precision bf16` runs it) or `tiles` (`nn` on the WEMoE layer's tiles: `expert_linear` with one group and
//! one task vector whose coefficient is zero, so each tile's merge copies the weight's and the product is the
//! dense one).

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
    let layout = args.get(4).context("usage: gemm_probe M K N REPS nn|nt|bf16|tiles")?;
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0f32; m * n];
    let rhs = match layout.as_str() {
        "nn" | "bf16" | "tiles" => MatRef::row_major(&b, k, n)?,
        "nt" => MatRef::row_major(&b, n, k)?.t(),
        other => bail!("layout '{other}': expected nn, nt, bf16 or tiles"),
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
    times.sort_by(f64::total_cmp);
    println!("{}", times[times.len() / 2]);
    Ok(())
}
