//! The CPU's results do not depend on how many threads compute them: the forward (both routings), the
//! adaptation loss and every router gradient are bit-identical in pools of 1, 2 and 3 threads, so `--threads`
//! changes how fast a run goes, never what it computes.

mod common;

use common::*;
use wemoe_engine::autograd::{entropy_loss_and_router_gradients, TaskBatch};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::device::CpuBackend;
use wemoe_engine::model::{Heads, ImageEncoder, Routing};
use wemoe_engine::tensor::Tensor;

/// `f` run in a pool of its own with `threads` threads.
fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

/// Every value's bits, so that a difference in the last place counts.
fn bits(t: &Tensor) -> Vec<u32> {
    t.host().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// The fixture's 4 images of `task`, repeated `copies` times, each copy brightened a little (more rows than
/// threads, all different, so that any sum split by thread count would show).
fn images(task: &str, copies: usize) -> Tensor {
    let (shape, values) = reference(&format!("adapt/{task}.safetensors"), "pixel_values");
    let mut all = Vec::with_capacity(values.len() * copies);
    for c in 0..copies {
        all.extend(values.iter().map(|v| v + 0.05 * c as f32));
    }
    Tensor::from_vec(&[shape[0] * copies, shape[1], shape[2], shape[3]], all).unwrap()
}

/// Everything the CPU computes from the fixture model in one pool: the forward's outputs and routing
/// weights, then the loss and the router gradients.
fn results(threads: usize, routing: Routing) -> Vec<(String, Vec<u32>)> {
    in_pool(threads, || {
        let be = CpuBackend::new();
        let dir = ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap();
        let model = ImageEncoder::load(&be, &dir).unwrap();
        let heads = Heads::open(&be, &fixture("adapt/heads.safetensors")).unwrap();
        let classifier = heads.classifier(&model, &dir.path).unwrap();
        let tasks: Vec<TaskBatch> = ["left", "right"]
            .iter()
            .map(|t| TaskBatch { head: heads.head(t).unwrap(), pixels: images(t, 6) })
            .collect();
        let out = model.encode(&be, &tasks[0].pixels, routing).unwrap();
        let mut all = vec![("pooled".to_string(), bits(&out.pooled))];
        all.extend(out.routing_weights.iter().enumerate().map(|(l, w)| (format!("routing_weights.{l}"), bits(w))));
        let (loss, grads) = entropy_loss_and_router_gradients(&be, &model, &classifier, &tasks, routing).unwrap();
        let loss = loss.to_bits();
        all.push(("loss".to_string(), vec![(loss >> 32) as u32, loss as u32]));
        all.extend(grads.iter().map(|(name, g)| (name.clone(), bits(g))));
        all
    })
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    for routing in [Routing::Sample, Routing::Batch] {
        let one = results(1, routing);
        assert_eq!(one.len(), 3 + 1 + 8, "{routing:?}: pooled, 2 layers' routing weights, loss, 8 gradients");
        for threads in [2, 3] {
            let many = results(threads, routing);
            assert_eq!(many.len(), one.len());
            for ((name, a), (_, b)) in one.iter().zip(&many) {
                let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
                assert!(
                    differ == 0,
                    "{routing:?} {name}: {differ} of {} values differ with {threads} threads",
                    a.len()
                );
            }
        }
    }
}
