//! Tracked versions of the forward ops: each computes through the backend and, when an input is tracked,
//! records a backward step holding only what that step needs.

use anyhow::Result;

use super::tape::{Tape, Var};
use crate::device::{Activation, Backend, ExpertLinear, LinearWeight};
use crate::model::{Embeddings, LayerNorm, Linear};
use crate::tensor::Tensor;

/// A value and, when it depends on a parameter, its place on the tape.
pub struct Tracked {
    /// The value.
    pub value: Tensor,
    /// Its tape variable; `None` for values no parameter influences (nothing is recorded for them).
    pub var: Option<Var>,
}

impl Tracked {
    /// A value no parameter influences.
    pub fn constant(value: Tensor) -> Self {
        Tracked { value, var: None }
    }
}

/// The output's variable when any input is tracked.
fn output_var(tape: &mut Tape, inputs: &[Option<Var>]) -> Option<Var> {
    inputs.iter().any(Option::is_some).then(|| tape.var())
}

/// A saved copy of a tracked input's value, for its backward step.
fn save(be: &dyn Backend, x: &Tracked) -> Result<Tensor> {
    be.copy(&x.value)
}

pub fn layer_norm<'a>(be: &dyn Backend, tape: &mut Tape<'a>, x: &Tracked, ln: &'a LayerNorm) -> Result<Tracked> {
    let value = ln.forward(be, &x.value)?;
    let Some(out) = output_var(tape, &[x.var]) else { return Ok(Tracked::constant(value)) };
    let (saved, xv) = (save(be, x)?, x.var.expect("tracked"));
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, xv, be.layer_norm_backward(&saved, &ln.weight, ln.eps, &dy)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// A LayerNorm with trainable affine parameters: their gradients go to `{name}.weight` and `{name}.bias`, and
/// the input's to the input.
pub fn layer_norm_param<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    x: &Tracked,
    ln: &'a LayerNorm,
    name: String,
) -> Result<Tracked> {
    let value = ln.forward(be, &x.value)?;
    let out = tape.var();
    let (saved, xv) = (save(be, x)?, x.var);
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            let (dw, db) = be.layer_norm_backward_params(&saved, ln.eps, &dy)?;
            g.add_param(be, &format!("{name}.weight"), dw)?;
            g.add_param(be, &format!("{name}.bias"), db)?;
            if let Some(xv) = xv {
                g.add(be, xv, be.layer_norm_backward(&saved, &ln.weight, ln.eps, &dy)?)?;
            }
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// CLIP's embeddings of `pixels` with trainable parameters: their gradients go to `{prefix}.class_embedding`,
/// `{prefix}.patch_embedding.weight` and `{prefix}.position_embedding.weight`.
pub fn patch_embed_param<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    pixels: &Tensor,
    e: &'a Embeddings,
    prefix: String,
) -> Result<Tracked> {
    let value = be.patch_embed(pixels, &e.patch_embedding, &e.class_embedding, &e.position_embedding)?;
    let out = tape.var();
    let saved = be.copy(pixels)?;
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            let (dw, dc, dp) = be.patch_embed_backward(&saved, e.patch_embedding.shape(), &dy)?;
            g.add_param(be, &format!("{prefix}.patch_embedding.weight"), dw)?;
            g.add_param(be, &format!("{prefix}.class_embedding"), dc)?;
            g.add_param(be, &format!("{prefix}.position_embedding.weight"), dp)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// A linear layer with a frozen weight: only the input's gradient.
pub fn linear<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    x: &Tracked,
    w: &'a LinearWeight,
    b: Option<&Tensor>,
) -> Result<Tracked> {
    let value = be.linear(&x.value, w, b)?;
    let Some(out) = output_var(tape, &[x.var]) else { return Ok(Tracked::constant(value)) };
    let xv = x.var.expect("tracked");
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, xv, be.linear_backward_input(&dy, w)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// A trainable linear layer (a router's): the weight's and bias's gradients go to `{name}.weight` and
/// `{name}.bias`, and the input's to the input.
pub fn linear_param<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    x: &Tracked,
    lin: &'a Linear,
    name: String,
) -> Result<Tracked> {
    let value = lin.forward(be, &x.value)?;
    let out = tape.var();
    let (saved, xv) = (save(be, x)?, x.var);
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            let (dw, db) = be.linear_backward_weight(&saved, &dy)?;
            g.add_param(be, &format!("{name}.weight"), dw)?;
            g.add_param(be, &format!("{name}.bias"), db)?;
            if let Some(xv) = xv {
                g.add(be, xv, be.linear_backward_input(&dy, &lin.weight)?)?;
            }
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// A trainable tensor used as it is (a depth-0 router's coefficients): its gradient goes to `name`.
pub fn parameter<'a>(be: &dyn Backend, tape: &mut Tape<'a>, value: &Tensor, name: String) -> Result<Tracked> {
    let out = tape.var();
    let shape = value.shape().to_vec();
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            // The stored parameter's own shape (the model views it as [1, 1, T]).
            let flat = be.copy(&dy)?.reshape(&[shape.iter().product()])?;
            g.add_param(be, &name, flat)?;
        }
        Ok(())
    }));
    Ok(Tracked { value: be.copy(value)?, var: Some(out) })
}

pub fn activation<'a>(be: &dyn Backend, tape: &mut Tape<'a>, x: Tracked, act: Activation) -> Result<Tracked> {
    let Some(xv) = x.var else { return Ok(Tracked::constant(be.activation(x.value, act)?)) };
    let value = be.activated(&x.value, act)?;
    let out = tape.var();
    let z = x.value;
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, xv, be.activation_backward(&z, &dy, act)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// `a + b`.
pub fn add<'a>(be: &dyn Backend, tape: &mut Tape<'a>, a: Tracked, b: &Tracked) -> Result<Tracked> {
    let value = be.add(a.value, &b.value)?;
    let Some(out) = output_var(tape, &[a.var, b.var]) else { return Ok(Tracked::constant(value)) };
    let (av, bv) = (a.var, b.var);
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            if let Some(bv) = bv {
                g.add(be, bv, be.copy(&dy)?)?;
            }
            if let Some(av) = av {
                g.add(be, av, dy)?;
            }
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// Self-attention of `q`, `k` and `v`, which it takes: the forward uses them nowhere else, so the backward
/// keeps them as they are instead of copies.
pub fn attention<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    q: Tracked,
    k: Tracked,
    v: Tracked,
    heads: usize,
) -> Result<Tracked> {
    let value = be.attention(&q.value, &k.value, &v.value, heads)?;
    let Some(out) = output_var(tape, &[q.var, k.var, v.var]) else { return Ok(Tracked::constant(value)) };
    let vars = [q.var, k.var, v.var];
    let (qs, ks, vs) = (q.value, k.value, v.value);
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            let (dq, dk, dv) = be.attention_backward(&qs, &ks, &vs, &dy, heads)?;
            for (var, grad) in vars.into_iter().zip([dq, dk, dv]) {
                if let Some(var) = var {
                    g.add(be, var, grad)?;
                }
            }
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

pub fn router_reduce<'a>(be: &dyn Backend, tape: &mut Tape<'a>, logits: &Tracked, softmax: bool) -> Result<Tracked> {
    let value = be.router_reduce(&logits.value, softmax)?;
    let Some(out) = output_var(tape, &[logits.var]) else { return Ok(Tracked::constant(value)) };
    let (saved, lv) = (save(be, logits)?, logits.var.expect("tracked"));
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, lv, be.router_reduce_backward(&saved, softmax, &dy)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// The mean over rows `[B, T]` to `[1, T]` (batch routing).
pub fn mean_rows<'a>(be: &dyn Backend, tape: &mut Tape<'a>, x: &Tracked) -> Result<Tracked> {
    let value = be.mean_rows(&x.value)?;
    let Some(out) = output_var(tape, &[x.var]) else { return Ok(Tracked::constant(value)) };
    let (rows, xv) = (x.value.shape()[0], x.var.expect("tracked"));
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            // Each row receives dy / rows: the router reduction's own backward spreads [1, T] over one "token"
            // per row, so reuse it on a [1, rows, T] view.
            let width = dy.shape()[1];
            let logits = be.upload(Tensor::zeros(&[1, rows, width]))?;
            let spread = be.router_reduce_backward(&logits, false, &dy)?;
            g.add(be, xv, spread.reshape(&[rows, width])?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

/// A WEMoE linear layer of `x`, which it takes (kept for the backward as it is, not copied), merged by `c`.
pub fn expert_linear<'a>(
    be: &dyn Backend,
    tape: &mut Tape<'a>,
    x: Tracked,
    c: &Tracked,
    w: &'a ExpertLinear,
) -> Result<Tracked> {
    let value = be.expert_linear(&x.value, &c.value, w)?;
    let Some(out) = output_var(tape, &[x.var, c.var]) else { return Ok(Tracked::constant(value)) };
    let (xv, cv) = (x.var, c.var);
    let (xs, cs) = (x.value, save(be, c)?);
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            let (dx, dc) = be.expert_linear_backward(&xs, &cs, w, &dy, xv.is_some())?;
            if let Some(xv) = xv {
                let dx = dx.ok_or_else(|| anyhow::anyhow!("expert_linear_backward: no input gradient returned"))?;
                g.add(be, xv, dx)?;
            }
            if let Some(cv) = cv {
                g.add(be, cv, dc)?;
            }
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

pub fn select_token<'a>(be: &dyn Backend, tape: &mut Tape<'a>, x: &Tracked, index: usize) -> Result<Tracked> {
    let value = be.select_token(&x.value, index)?;
    let Some(out) = output_var(tape, &[x.var]) else { return Ok(Tracked::constant(value)) };
    let (tokens, xv) = (x.value.shape()[1], x.var.expect("tracked"));
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, xv, be.select_token_backward(&dy, tokens, index)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

pub fn l2_normalize<'a>(be: &dyn Backend, tape: &mut Tape<'a>, x: &Tracked) -> Result<Tracked> {
    let value = be.l2_normalize(&x.value)?;
    let Some(out) = output_var(tape, &[x.var]) else { return Ok(Tracked::constant(value)) };
    let (saved, xv) = (save(be, x)?, x.var.expect("tracked"));
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, xv, be.l2_normalize_backward(&saved, &dy)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}

pub fn scale<'a>(be: &dyn Backend, tape: &mut Tape<'a>, x: &Tracked, factor: f32) -> Result<Tracked> {
    let value = be.scale(&x.value, factor)?;
    let Some(out) = output_var(tape, &[x.var]) else { return Ok(Tracked::constant(value)) };
    let xv = x.var.expect("tracked");
    tape.record(Box::new(move |be, g| {
        if let Some(dy) = g.take(out) {
            g.add(be, xv, be.scale(&dy, factor)?)?;
        }
        Ok(())
    }));
    Ok(Tracked { value, var: Some(out) })
}
