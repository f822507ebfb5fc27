//! Times the CPU WEMoE layer at an adaptation step's fc1 shape (8 tasks × 800 rows, 768 → 3072, 8 experts)
//! two ways: one call per task (one merge each, as the step runs now) and one call with a group per task (the
//! sources read once for all eight), forward and backward: `task_groups_probe [REPS]`, medians in ms. Run it
//! under the command line's heap policy (`src/cli/heap.rs`), which an example does not set:
//! `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296`.
use std::time::Instant;

use wemoe_engine::ops::expert_linear::{expert_linear, expert_linear_backward, to_blocked, ExpertLinearRef};
use wemoe_engine::rng::Rng;

fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let reps = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let (d, h, t, tasks, rows) = (768usize, 3072usize, 8usize, 8usize, 800usize);
    let mut rng = Rng::new(5);
    let base = to_blocked(&rng.normal_vec(h * d, 0.0, 0.02), h, d);
    let bias = rng.normal_vec(h, 0.0, 0.02);
    let vectors: Vec<Vec<f32>> = (0..t).map(|_| to_blocked(&rng.normal_vec(h * d, 0.0, 0.002), h, d)).collect();
    let vector_biases: Vec<Vec<f32>> = (0..t).map(|_| rng.normal_vec(h, 0.0, 0.002)).collect();
    let w = ExpertLinearRef {
        base_weight: &base,
        base_bias: &bias,
        task_weights: vectors.iter().map(Vec::as_slice).collect(),
        task_biases: vector_biases.iter().map(Vec::as_slice).collect(),
        out_features: h,
        in_features: d,
    };
    let x = rng.normal_vec(tasks * rows * d, 0.0, 1.0);
    let c = rng.normal_vec(tasks * t, 0.3, 0.1);
    let dy = rng.normal_vec(tasks * rows * h, 0.0, 1.0);
    let task = |i: usize| {
        (&x[i * rows * d..(i + 1) * rows * d], &c[i * t..(i + 1) * t], &dy[i * rows * h..(i + 1) * rows * h])
    };
    let per_task = median(reps, || {
        for i in 0..tasks {
            let (x, c, _) = task(i);
            std::hint::black_box(expert_linear(x, 1, rows, c, &w).unwrap());
        }
    });
    let grouped = median(reps, || drop(std::hint::black_box(expert_linear(&x, tasks, rows, &c, &w).unwrap())));
    let per_task_backward = median(reps, || {
        for i in 0..tasks {
            let (x, c, dy) = task(i);
            std::hint::black_box(expert_linear_backward(x, 1, rows, c, &w, dy, true).unwrap());
        }
    });
    let grouped_backward = median(reps, || {
        drop(std::hint::black_box(expert_linear_backward(&x, tasks, rows, &c, &w, &dy, true).unwrap()))
    });
    println!("forward: a call per task {per_task:.1} ms, one call of {tasks} groups {grouped:.1} ms");
    println!(
        "backward: a call per task {per_task_backward:.1} ms, one call of {tasks} groups {grouped_backward:.1} ms"
    );
    Ok(())
}
