//! The routers' parameters as Adam sees them: canonical host tensors by name, written back into the model
//! (re-prepared by the backend) after each step.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::device::Backend;
use crate::model::{gate_tensors, ImageEncoder, Linear, Mlp, Router, WeightSource};
use crate::tensor::Tensor;

/// Every router tensor of a WEMoE model, by canonical name, with its shape.
#[derive(Clone)]
pub struct RouterParams {
    /// Values, PyTorch layout.
    pub values: BTreeMap<String, Vec<f32>>,
    /// Shapes.
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl RouterParams {
    /// Reads every router tensor of `model` from its checkpoint `src`.
    pub fn load(model: &ImageEncoder, src: &dyn WeightSource) -> Result<Self> {
        let mut values = BTreeMap::new();
        let mut shapes = BTreeMap::new();
        for (l, layer) in model.vision.layers.iter().enumerate() {
            let Mlp::Wemoe(moe) = &layer.mlp else { bail!("layer {l} has no router: not a WEMoE model") };
            let depth = match moe.gate {
                Router::Constant(_) => 0,
                Router::Linear(_) => 1,
                Router::Mlp { .. } => 2,
            };
            let (d, t) = (model.vision.config.hidden_size, moe.fc1.experts());
            for (leaf, shape) in gate_tensors(depth, d, t) {
                let name = format!("vision_model.encoder.layers.{l}.mlp.gate.{leaf}");
                values.insert(name.clone(), src.get(&name, &shape)?.host()?.to_vec());
                shapes.insert(name, shape);
            }
        }
        Ok(RouterParams { values, shapes })
    }

    /// Routers that ignore their input and give every sample the coefficients `w` (one per expert) in every
    /// layer: the last layer's weight zero and its bias `w` (depth 1 and 2), or the free vector `w` (depth 0).
    pub fn constant(&self, w: &[f32]) -> Result<RouterParams> {
        let mut fixed = self.clone();
        for (name, values) in fixed.values.iter_mut() {
            let leaf = name.rsplit_once(".gate.").map_or("", |(_, leaf)| leaf);
            match leaf {
                "fc2.weight" | "fc.weight" => values.fill(0.0),
                "fc2.bias" | "fc.bias" | "weight" => {
                    if values.len() != w.len() {
                        bail!("router tensor '{name}' has {} experts, not {}", values.len(), w.len());
                    }
                    values.copy_from_slice(w);
                }
                _ => {}
            }
        }
        Ok(fixed)
    }

    /// Writes every value back into `model`'s routers, prepared by `be`.
    pub fn apply(&self, be: &dyn Backend, model: &mut ImageEncoder) -> Result<()> {
        for (l, layer) in model.vision.layers.iter_mut().enumerate() {
            let Mlp::Wemoe(moe) = &mut layer.mlp else { bail!("layer {l} has no router") };
            let gate = format!("vision_model.encoder.layers.{l}.mlp.gate");
            let get = |leaf: &str| -> Result<Tensor> {
                let name = format!("{gate}.{leaf}");
                let v = self.values.get(&name).with_context(|| format!("no value for router tensor '{name}'"))?;
                Tensor::from_vec(&self.shapes[&name], v.clone())
            };
            let set = |lin: &mut Linear, prefix: &str| -> Result<()> {
                lin.weight = be.prepare_linear(get(&format!("{prefix}.weight"))?)?;
                lin.bias = Some(be.upload(get(&format!("{prefix}.bias"))?)?);
                Ok(())
            };
            match &mut moe.gate {
                Router::Constant(w) => {
                    let t = w.numel();
                    *w = be.upload(get("weight")?.reshape(&[1, 1, t])?)?;
                }
                Router::Linear(fc) => set(fc, "fc")?,
                Router::Mlp { fc1, fc2 } => {
                    set(fc1, "fc1")?;
                    set(fc2, "fc2")?;
                }
            }
        }
        Ok(())
    }
}
