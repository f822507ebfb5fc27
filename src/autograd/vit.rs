//! The CLIP vision model's forward recorded on a tape, and the adaptation loss with its gradients.
//!
//! Two kinds of adaptation train different parameters ([`Trainable`]). WEMoE's trains the routers: nothing is
//! recorded before the first router, and from the first WEMoE layer on every op records its backward step, so
//! the gradient of a router flows back through every later layer, the projection and the heads, and through
//! the router's own input into the layers before it. AdaMerging's trains every parameter of a plain model
//! (their gradients are contracted with the task vectors afterwards), so everything from the patch embedding
//! on is recorded.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};

use super::ops::{self, Tracked};
use super::tape::Tape;
use crate::device::{Activation, Backend, LinearWeight};
use crate::model::{Classifier, ImageEncoder, LayerNorm, Linear, Mlp, Router, RouterActivation, Routing};
use crate::tensor::Tensor;

/// One task's images and head, for one step of adaptation.
pub struct TaskBatch<'a> {
    /// The task's class embeddings `[C, P]`.
    pub head: &'a LinearWeight,
    /// Its images, preprocessed, `[B, 3, S, S]`.
    pub pixels: Tensor,
}

/// Which parameters a backward pass keeps gradients for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trainable {
    /// The WEMoE routers (test-time adaptation of a WEMoE model).
    Routers,
    /// Every parameter of the vision tower, by its checkpoint name (`vision_model.…`); the model must be a
    /// plain CLIP one (AdaMerging).
    Everything,
}

/// A linear layer, trainable as `name` when `name` is given.
fn linear<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    x: &Tracked,
    lin: &'a Linear,
    name: Option<String>,
) -> Result<Tracked> {
    match name {
        Some(name) => ops::linear_param(be, tape, x, lin, name),
        None => ops::linear(be, tape, x, &lin.weight, lin.bias.as_ref()),
    }
}

/// A LayerNorm, trainable as `name` when `name` is given.
fn layer_norm<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    x: &Tracked,
    ln: &'a LayerNorm,
    name: Option<String>,
) -> Result<Tracked> {
    match name {
        Some(name) => ops::layer_norm_param(be, tape, x, ln, name),
        None => ops::layer_norm(be, tape, x, ln),
    }
}

/// The pooled output of `pixels`, recorded on `tape`.
fn forward<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    model: &'a ImageEncoder,
    pixels: &Tensor,
    routing: Routing,
    trainable: Trainable,
) -> Result<Tracked> {
    let vision = &model.vision;
    let e = &vision.embeddings;
    // Every parameter's name when everything trains, else none (frozen).
    let all = trainable == Trainable::Everything;
    let name = |n: String| all.then(|| format!("vision_model.{n}"));
    let x = if all {
        ops::patch_embed_param(be, tape, pixels, e, "vision_model.embeddings".into())?
    } else {
        Tracked::constant(be.patch_embed(pixels, &e.patch_embedding, &e.class_embedding, &e.position_embedding)?)
    };
    let mut x = layer_norm(be, tape, &x, &vision.pre_layrnorm, name("pre_layrnorm".into()))?;
    for (l, layer) in vision.layers.iter().enumerate() {
        let at = |n: &str| name(format!("encoder.layers.{l}.{n}"));
        let h = layer_norm(be, tape, &x, &layer.layer_norm1, at("layer_norm1"))?;
        let attn = &layer.self_attn;
        let q = linear(be, tape, &h, &attn.q_proj, at("self_attn.q_proj"))?;
        let k = linear(be, tape, &h, &attn.k_proj, at("self_attn.k_proj"))?;
        let v = linear(be, tape, &h, &attn.v_proj, at("self_attn.v_proj"))?;
        let a = ops::attention(be, tape, q, k, v, attn.heads)?;
        let o = linear(be, tape, &a, &attn.out_proj, at("self_attn.out_proj"))?;
        let h = ops::add(be, tape, o, &x)?;
        let n2 = layer_norm(be, tape, &h, &layer.layer_norm2, at("layer_norm2"))?;
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
                let y = linear(be, tape, &input, &mlp.fc1, at("mlp.fc1"))?;
                let y = ops::activation(be, tape, y, mlp.activation)?;
                linear(be, tape, &y, &mlp.fc2, at("mlp.fc2"))?
            }
            Mlp::Wemoe(_) if all => bail!("layer {l} is a WEMoE layer: only a plain CLIP model trains every parameter"),
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
    layer_norm(be, tape, &x, &vision.post_layernorm, name("post_layernorm".into()))
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
    entropy_loss_and_gradients(be, model, classifier, tasks, routing, Trainable::Routers)
}

/// The adaptation loss (as [`entropy_loss_and_router_gradients`]) and its gradient with respect to the
/// `trainable` parameters, by canonical name, summed over the tasks.
pub fn entropy_loss_and_gradients(
    be: &dyn Backend,
    model: &ImageEncoder,
    classifier: &Classifier,
    tasks: &[TaskBatch],
    routing: Routing,
    trainable: Trainable,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    ensure!(!tasks.is_empty(), "adaptation needs at least one task");
    let mut loss = 0.0;
    let mut gradients: BTreeMap<String, Tensor> = BTreeMap::new();
    for task in tasks {
        let mut tape = Tape::new();
        let pooled = forward(be, &mut tape, model, &task.pixels, routing, trainable)?;
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
