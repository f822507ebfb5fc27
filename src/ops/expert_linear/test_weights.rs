//! The weights the tests of the WEMoE linear layer share.

use super::{to_blocked, ExpertLinearRef};
use crate::ops::gradcheck::values;

/// Test weights `[in, out]` (element (output j, input kk) at kk·o + j): base, biases, T task vectors; and
/// the weights blocked, for the view the kernels read.
pub(super) struct Weights {
    pub(super) base_w: Vec<f32>,
    pub(super) base_b: Vec<f32>,
    pub(super) tw: Vec<Vec<f32>>,
    pub(super) tb: Vec<Vec<f32>>,
    pub(super) blocked: Vec<Vec<f32>>,
    pub(super) k: usize,
    pub(super) o: usize,
}

impl Weights {
    pub(super) fn new(k: usize, o: usize, t: usize) -> Self {
        let base_w = values(k * o, 1);
        let tw: Vec<Vec<f32>> = (0..t).map(|i| values(k * o, 10 + i)).collect();
        let blocked = std::iter::once(&base_w)
            .chain(&tw)
            .map(|w| to_blocked(&crate::ops::transpose::transpose(w, k, o), o, k))
            .collect();
        Weights { base_w, base_b: values(o, 2), tw, tb: (0..t).map(|i| values(o, 20 + i)).collect(), blocked, k, o }
    }

    pub(super) fn view(&self) -> ExpertLinearRef<'_> {
        ExpertLinearRef {
            base_weight: &self.blocked[0],
            base_bias: &self.base_b,
            task_weights: self.blocked[1..].iter().map(Vec::as_slice).collect(),
            task_biases: self.tb.iter().map(Vec::as_slice).collect(),
            out_features: self.o,
            in_features: self.k,
        }
    }
}
