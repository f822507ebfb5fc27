//! The CLIP vision model's forward recorded on a tape, and the adaptation loss with its router gradients.
//!
//! Nothing is recorded before the first router: the embeddings and everything no router influences stay
//! untracked. From the first WEMoE layer on, every op records its backward step, so the gradient of a
//! router flows back through every later layer, the projection and the heads, and through the router's own
//! input into the layers before it.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};

use super::ops::{self, Tracked};
use super::tape::Tape;
use crate::device::{Activation, Backend, LinearWeight};
use crate::model::{Classifier, ImageEncoder, Mlp, Router, RouterActivation, Routing};
use crate::tensor::Tensor;

/// One task's images and head, for one step of adaptation.
pub struct TaskBatch<'a> {
    /// The task's class embeddings `[C, P]`.
    pub head: &'a LinearWeight,
    /// Its images, preprocessed, `[B, 3, S, S]`.
    pub pixels: Tensor,
}

/// The pooled output of `pixels`, recorded on `tape`.
fn forward<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    model: &'a ImageEncoder,
    pixels: &Tensor,
    routing: Routing,
) -> Result<Tracked> {
    let vision = &model.vision;
    let e = &vision.embeddings;
    let x = be.patch_embed(pixels, &e.patch_embedding, &e.class_embedding, &e.position_embedding)?;
    let mut x = Tracked::constant(vision.pre_layrnorm.forward(be, &x)?);
    for (l, layer) in vision.layers.iter().enumerate() {
        let h = ops::layer_norm(be, tape, &x, &layer.layer_norm1)?;
        let attn = &layer.self_attn;
        let q = ops::linear(be, tape, &h, &attn.q_proj.weight, attn.q_proj.bias.as_ref())?;
        let k = ops::linear(be, tape, &h, &attn.k_proj.weight, attn.k_proj.bias.as_ref())?;
        let v = ops::linear(be, tape, &h, &attn.v_proj.weight, attn.v_proj.bias.as_ref())?;
        let a = ops::attention(be, tape, q, k, v, attn.heads)?;
        let o = ops::linear(be, tape, &a, &attn.out_proj.weight, attn.out_proj.bias.as_ref())?;
        let h = ops::add(be, tape, o, &x)?;
        let n2 = ops::layer_norm(be, tape, &h, &layer.layer_norm2)?;
        // The pooled output reads the last layer at the class token only: its MLP and residual run on those
        // rows (as `ClipEncoderLayer::forward_class_token`), while its router still reads every token.
        let last = l + 1 == vision.layers.len();
        let class_rows = |tape: &mut Tape<'a>, x: Tracked| -> Result<Tracked> {
            if last {
                ops::select_token(be, tape, &x, 0)
            } else {
                Ok(x)
            }
        };
        let m = match &layer.mlp {
            Mlp::Dense(mlp) => {
                let input = class_rows(tape, n2)?;
                let y = ops::linear(be, tape, &input, &mlp.fc1.weight, mlp.fc1.bias.as_ref())?;
                let y = ops::activation(be, tape, y, mlp.activation)?;
                ops::linear(be, tape, &y, &mlp.fc2.weight, mlp.fc2.bias.as_ref())?
            }
            Mlp::Wemoe(moe) => {
                let gate = format!("vision_model.encoder.layers.{l}.mlp.gate");
                let softmax = moe.router_activation == RouterActivation::Softmax;
                let logits = match &moe.gate {
                    Router::Constant(w) => ops::parameter(be, tape, w, format!("{gate}.weight"))?,
                    Router::Linear(fc) => ops::linear_param(be, tape, &n2, fc, format!("{gate}.fc"))?,
                    Router::Mlp { fc1, fc2 } => {
                        let r = ops::linear_param(be, tape, &n2, fc1, format!("{gate}.fc1"))?;
                        let r = ops::activation(be, tape, r, Activation::Relu)?;
                        ops::linear_param(be, tape, &r, fc2, format!("{gate}.fc2"))?
                    }
                };
                let mut c = ops::router_reduce(be, tape, &logits, softmax)?;
                if routing == Routing::Batch && c.value.shape()[0] > 1 {
                    c = ops::mean_rows(be, tape, &c)?;
                }
                // The router has read `n2`; the expert layer takes it.
                let input = class_rows(tape, n2)?;
                let y = ops::expert_linear(be, tape, input, &c, &moe.fc1)?;
                let y = ops::activation(be, tape, y, moe.activation)?;
                ops::expert_linear(be, tape, y, &c, &moe.fc2)?
            }
        };
        let residual = class_rows(tape, h)?;
        x = ops::add(be, tape, m, &residual)?;
    }
    if vision.layers.is_empty() {
        x = ops::select_token(be, tape, &x, 0)?;
    }
    ops::layer_norm(be, tape, &x, &vision.post_layernorm)
}

/// The adaptation loss, the sum over tasks of the batch-mean entropy of softmax(logits), and its gradient
/// with respect to every router tensor (by canonical name), through the whole network.
pub fn entropy_loss_and_router_gradients(
    be: &dyn Backend,
    model: &ImageEncoder,
    classifier: &Classifier,
    tasks: &[TaskBatch],
    routing: Routing,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    ensure!(!tasks.is_empty(), "adaptation needs at least one task");
    let mut loss = 0.0;
    let mut gradients: BTreeMap<String, Tensor> = BTreeMap::new();
    for task in tasks {
        let mut tape = Tape::new();
        let pooled = forward(be, &mut tape, model, &task.pixels, routing)?;
        let embeds = ops::linear(be, &mut tape, &pooled, classifier.projection(), None)?;
        let normed = ops::l2_normalize(be, &mut tape, &embeds)?;
        let logits = ops::linear(be, &mut tape, &normed, task.head, None)?;
        let logits = ops::scale(be, &mut tape, &logits, classifier.scale())?;
        let (entropy, seed) = be.softmax_entropy(&logits.value)?;
        loss += entropy;
        let Some(root) = logits.var else { continue };
        for (name, g) in tape.backward(be, root, seed)?.into_params() {
            let sum = match gradients.remove(&name) {
                Some(prev) => be.add(prev, &g)?,
                None => g,
            };
            gradients.insert(name, sum);
        }
    }
    Ok((loss, gradients))
}
