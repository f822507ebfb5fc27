//! Times quick_gelu over the activations of one ViT-B/32 MLP at batch 64 (64 × 50 × 3072 values), forward in
//! place and backward: `activation_probe [REPS]` prints the medians in milliseconds.
use std::time::Instant;

use wemoe_engine::device::Activation;
use wemoe_engine::ops::activation::{activation_backward, activation_in_place};

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    // The command line's heap policy: each backward's fresh 39 MB output reuses freed pages, as in `adapt`.
    wemoe_engine::heap::keep_freed_memory();
    let reps = std::env::args().nth(1).and_then(|r| r.parse().ok()).unwrap_or(11);
    let n = 64 * 50 * 3072;
    let mut x: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) / 100.0).collect();
    let dy = x.clone();
    let (mut forward, mut backward) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        activation_in_place(&mut x, Activation::QuickGelu);
        forward.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        drop(activation_backward(&x, &dy, Activation::QuickGelu));
        backward.push(t.elapsed().as_secs_f64());
    }
    println!(
        "quick_gelu over {n} values: forward {:.2} ms, backward {:.2} ms",
        median(forward) * 1e3,
        median(backward) * 1e3
    );
}
