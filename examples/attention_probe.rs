//! Times the CPU attention of one ViT-B/32 layer (12 heads, 50 tokens, width 768), forward and backward:
//! `attention_probe [BATCH] [REPS] [TOKENS]` prints the medians in milliseconds (TOKENS 197 for ViT-B/16's).
use std::time::Instant;

use wemoe_engine::ops::attention::{attention, attention_backward};
use wemoe_engine::rng::Rng;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As the command line runs: each fresh output reuses freed pages instead of faulting in new ones.
    wemoe_engine::heap::keep_freed_memory();
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (batch, reps) = (args.first().copied().unwrap_or(64), args.get(1).copied().unwrap_or(11));
    let tokens = args.get(2).copied().unwrap_or(50);
    let (width, heads) = (768, 12);
    let n = batch * tokens * width;
    let mut rng = Rng::new(1);
    let (q, k, v, d) = (
        rng.normal_vec(n, 0.0, 1.0),
        rng.normal_vec(n, 0.0, 1.0),
        rng.normal_vec(n, 0.0, 1.0),
        rng.normal_vec(n, 0.0, 1.0),
    );
    let (mut forward, mut backward) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        drop(attention(&q, &k, &v, batch, tokens, width, heads)?);
        forward.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        drop(attention_backward(&q, &k, &v, &d, batch, tokens, width, heads)?);
        backward.push(t.elapsed().as_secs_f64());
    }
    println!(
        "attention, {batch} × {tokens} tokens, width {width}, {heads} heads: forward {:.2} ms, backward {:.2} ms",
        median(forward) * 1e3,
        median(backward) * 1e3
    );
    Ok(())
}
