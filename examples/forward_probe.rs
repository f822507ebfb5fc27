//! Times the ViT-B/32-shaped forward (random weights) for profiling: `forward_probe BATCH REPS`.
use std::time::Instant;

use wemoe_engine::config::VisionConfig;
use wemoe_engine::device::CpuBackend;
use wemoe_engine::model::{ImageEncoder, Routing};
use wemoe_engine::tensor::Tensor;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (batch, reps) = (args.first().copied().unwrap_or(16), args.get(1).copied().unwrap_or(3));
    let be = CpuBackend::new();
    let config = VisionConfig::default();
    let model = ImageEncoder::random(&be, &config, None, 0)?;
    let s = config.image_size;
    let pixels = Tensor::from_vec(
        &[batch, 3, s, s],
        (0..batch * 3 * s * s).map(|i| ((i % 255) as f32) / 128.0 - 1.0).collect(),
    )?;
    model.encode(&be, &pixels, Routing::Sample)?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        model.encode(&be, &pixels, Routing::Sample)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("{{\"batch\": {batch}, \"median_s\": {median:.4}, \"images_per_s\": {:.2}}}", batch as f64 / median);
    Ok(())
}
