//! Weights as a backend stores them: dense linear weights in its preferred layout, and WEMoE's expert
//! linear layers (pretrained weight plus task vectors).

use anyhow::{bail, ensure, Result};

use crate::ops::expert_linear::blocked_shape;
use crate::tensor::Tensor;

/// How a prepared linear weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// PyTorch's `[out, in]`.
    OutIn,
    /// Transposed, `[in, out]`.
    InOut,
    /// Blocks of 32 outputs, `[⌈out/32⌉, in, 32]`, zero-padded: the CPU backend's expert weights (see
    /// [`to_blocked`](crate::ops::expert_linear::to_blocked)); never a dense Linear's.
    Blocked,
}

/// A Linear layer's weight, stored in the layout its backend multiplies fastest; made from PyTorch's
/// `[out, in]` by [`Backend::prepare_linear`](super::Backend::prepare_linear), so a transposed copy cannot be
/// mistaken for HF's layout.
pub struct LinearWeight {
    tensor: Tensor,
    layout: WeightLayout,
    out_features: usize,
    in_features: usize,
}

impl LinearWeight {
    /// Wraps `tensor`, stored as `layout`, of a Linear from `in_features` to `out_features`.
    pub fn new(tensor: Tensor, layout: WeightLayout, out_features: usize, in_features: usize) -> Result<Self> {
        let want = match layout {
            WeightLayout::OutIn => [out_features, in_features],
            WeightLayout::InOut => [in_features, out_features],
            WeightLayout::Blocked => bail!("a dense linear weight is never stored blocked"),
        };
        if tensor.shape() != want {
            bail!("linear weight {:?} does not match {layout:?} {out_features}×{in_features}", tensor.shape());
        }
        Ok(LinearWeight { tensor, layout, out_features, in_features })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The stored elements.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// How they are stored.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }
}

/// One WEMoE linear layer on a device: the pretrained weight and bias `[out]`, and each task's deltas of the
/// same shapes, the weights stored as `layout` says (made by `Backend::prepare_expert_linear`).
pub struct ExpertLinear {
    /// Pretrained weight.
    pub base_weight: Tensor,
    /// Pretrained bias.
    pub base_bias: Tensor,
    /// Each task's weight delta.
    pub task_weights: Vec<Tensor>,
    /// Each task's bias delta.
    pub task_biases: Vec<Tensor>,
    /// How the weights are stored.
    pub layout: WeightLayout,
    out_features: usize,
    in_features: usize,
}

impl ExpertLinear {
    /// Checks every shape against the base weight's, stored as `layout`.
    pub fn new(
        base_weight: Tensor,
        base_bias: Tensor,
        task_weights: Vec<Tensor>,
        task_biases: Vec<Tensor>,
        layout: WeightLayout,
    ) -> Result<Self> {
        let (s, bias) = (base_weight.shape(), base_bias.shape());
        ensure!(bias.len() == 1, "expert linear: base bias must be 1-D, got {bias:?}");
        let (out, inp) = match (layout, s) {
            (WeightLayout::OutIn, &[out, inp]) => (out, inp),
            (WeightLayout::InOut, &[inp, out]) => (out, inp),
            (WeightLayout::Blocked, &[_, inp, _]) if s == blocked_shape(bias[0], inp) => (bias[0], inp),
            _ => bail!("expert linear: base weight {s:?} is not {layout:?} for {} outputs", bias[0]),
        };
        ensure!(bias == [out], "expert linear: base bias {bias:?} for {out} outputs");
        ensure!(
            !task_weights.is_empty() && task_weights.len() == task_biases.len(),
            "expert linear: needs T ≥ 1 task vectors"
        );
        for (w, b) in task_weights.iter().zip(&task_biases) {
            ensure!(
                w.shape() == base_weight.shape() && b.shape() == base_bias.shape(),
                "expert linear: task vector shapes differ from the base"
            );
        }
        Ok(ExpertLinear {
            base_weight,
            base_bias,
            task_weights,
            task_biases,
            layout,
            out_features: out,
            in_features: inp,
        })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Number of experts, T.
    pub fn experts(&self) -> usize {
        self.task_weights.len()
    }
}
