//! Where a model's weights come from: a checkpoint, or a seeded generator for benchmarks and tests.

use anyhow::Result;

use crate::checkpoint::TensorStore;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A source of named, shape-checked weights on the host.
pub trait WeightSource {
    /// Tensor `name` with exactly `shape`; an error names the tensor and the file.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// True when the source has `name`.
    fn contains(&self, name: &str) -> bool;

    /// Called once `name` has been copied into the backend's own layout: a memory-mapped source drops
    /// its pages, so a tensor is not resident twice.
    fn release(&self, _name: &str) {}
}

impl WeightSource for TensorStore {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        TensorStore::get(self, name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        TensorStore::contains(self, name)
    }

    fn release(&self, name: &str) {
        TensorStore::release(self, name)
    }
}

/// Seeded random weights of any requested shape: LayerNorm weights near 1, biases and embeddings
/// small, matrices Normal(0, 0.02) like HF's CLIP init. Each tensor's stream depends on its name only.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        RandomWeights { seed }
    }
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut rng = Rng::new(self.seed ^ hash);
        let n = shape.iter().product();
        let is_norm = name.contains("layer_norm") || name.contains("layrnorm") || name.contains("layernorm");
        let values = if is_norm && name.ends_with("weight") {
            rng.normal_vec(n, 1.0, 0.02)
        } else if name.ends_with("bias") {
            rng.normal_vec(n, 0.0, 0.01)
        } else {
            rng.normal_vec(n, 0.0, 0.02)
        };
        Tensor::from_vec(shape, values)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
