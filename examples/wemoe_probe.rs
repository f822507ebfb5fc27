//! Times one WEMoE MLP layer at ViT-B/32 shapes (random weights): `wemoe_probe BATCH EXPERTS REPS [ONLY]`.
//! Prints per-sample and batch routing, the per-sample MLP of the class tokens alone (the last layer's, the
//! router still reading every token), and the dense MLP for reference, as JSON lines; `ONLY` (`wemoe_sample`,
//! `wemoe_batch`, `wemoe_sample_class` or `dense_mlp`) times that one alone, for a profile of it.
use std::time::Instant;

use wemoe_engine::config::VisionConfig;
use wemoe_engine::device::{Backend, CpuBackend};
use wemoe_engine::model::{ClipMlp, Linear, RandomWeights, RouterActivation, Routing, WemoeMlp, WemoeSpec};
use wemoe_engine::tensor::Tensor;

fn median(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|x| x.parse().ok()).collect();
    let only = std::env::args().nth(4);
    let timed = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let (batch, experts, reps) =
        (a.first().copied().unwrap_or(16), a.get(1).copied().unwrap_or(8), a.get(2).copied().unwrap_or(5));
    let be = CpuBackend::new();
    let c = VisionConfig::default();
    let src = RandomWeights::new(1);
    let spec = WemoeSpec {
        experts: (0..experts).map(|t| format!("e{t}")).collect(),
        router_layers: 2,
        router_activation: RouterActivation::Identity,
        init_lambda: Some(0.3),
    };
    let moe = WemoeMlp::load(&be, &src, "vision_model.encoder.layers.0.mlp", &c, &spec)?;
    let dense = ClipMlp {
        fc1: Linear::load(&be, &src, "x.fc1", c.intermediate_size, c.hidden_size, true)?,
        fc2: Linear::load(&be, &src, "x.fc2", c.hidden_size, c.intermediate_size, true)?,
        activation: c.hidden_act,
    };
    let n = c.tokens();
    let h = Tensor::from_vec(
        &[batch, n, c.hidden_size],
        (0..batch * n * c.hidden_size).map(|i| ((i % 91) as f32 - 45.0) / 30.0).collect(),
    )?;
    let class_tokens = be.select_token(&h, 0)?;
    let coefficients = moe.coefficients(&be, &h, Routing::Sample)?;
    type Run<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let runs: [Run; 4] = [
        ("wemoe_sample", Box::new(|| drop(moe.forward(&be, &h, Routing::Sample).unwrap()))),
        ("wemoe_batch", Box::new(|| drop(moe.forward(&be, &h, Routing::Batch).unwrap()))),
        ("wemoe_sample_class", Box::new(|| drop(moe.mix(&be, &class_tokens, &coefficients).unwrap()))),
        ("dense_mlp", Box::new(|| drop(dense.forward(&be, &h).unwrap()))),
    ];
    for (name, run) in runs.iter().filter(|(name, _)| timed(name)) {
        let t = median(run, reps);
        println!("{{\"layer\": \"{name}\", \"batch\": {batch}, \"experts\": {experts}, \"ms\": {:.2}}}", t * 1e3);
    }
    Ok(())
}
