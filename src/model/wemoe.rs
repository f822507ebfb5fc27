//! WEMoE (Tang et al., ICML 2024): each encoder layer's MLP holds the pretrained MLP, the T task vectors
//! and a router; the router's outputs on `layer_norm2`'s tokens, averaged over tokens, are the per-sample
//! merge coefficients of the MLP's weights. Names follow FusionBench's `WeightEnsemblingMoE`.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{Linear, WeightSource};
use crate::checkpoint::TensorStore;
use crate::config::{json_f32, VisionConfig};
use crate::device::{Activation, Backend, ExpertLinear};
use crate::tensor::Tensor;

/// How merge coefficients are shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Routing {
    /// Each sample its own coefficients (the paper's code).
    #[default]
    Sample,
    /// The batch's average coefficients, one merged MLP for the batch (FusionBench's `batch_reduce`).
    Batch,
}

/// What the router applies to its outputs before the token mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RouterActivation {
    /// Raw outputs are the coefficients (the reference).
    #[default]
    Identity,
    /// Softmax over experts.
    Softmax,
}

impl RouterActivation {
    /// The name used in config.json and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            RouterActivation::Identity => "identity",
            RouterActivation::Softmax => "softmax",
        }
    }

    /// Whether routers with this activation over `experts` experts give every input the same weights: a
    /// softmax over one expert is 1 whatever the router computes, so the routers have no effect on the model
    /// and adaptation has nothing to change.
    pub fn routes_every_input_alike(&self, experts: usize) -> bool {
        *self == RouterActivation::Softmax && experts == 1
    }
}

/// A WEMoE model's description: config.json's `"wemoe"` object.
#[derive(Clone, Debug, PartialEq)]
pub struct WemoeSpec {
    /// Expert (task) names, in the order of `task_vectors.{t}`.
    pub experts: Vec<String>,
    /// Router depth: 0 (a free coefficient vector), 1 (one Linear) or 2 (Linear, ReLU, Linear).
    pub router_layers: usize,
    /// Applied to router outputs before the token mean.
    pub router_activation: RouterActivation,
    /// λ of the shared parameters and the routers' initial bias, when known.
    pub init_lambda: Option<f32>,
}

/// A router's tensors at `depth` for width `d` and `t` experts: each leaf under `...mlp.gate.` (FusionBench's
/// names) and its shape, in a fixed order.
pub fn gate_tensors(depth: usize, d: usize, t: usize) -> Vec<(&'static str, Vec<usize>)> {
    match depth {
        0 => vec![("weight", vec![t])],
        1 => vec![("fc.weight", vec![t, d]), ("fc.bias", vec![t])],
        _ => vec![("fc1.weight", vec![d, d]), ("fc1.bias", vec![d]), ("fc2.weight", vec![t, d]), ("fc2.bias", vec![t])],
    }
}

/// The router keys of each depth, under `...mlp.gate.`.
const GATE_KEYS: [&str; 3] = ["weight", "fc.weight", "fc1.weight"];

impl WemoeSpec {
    /// Reads the `"wemoe"` object of `config.json`.
    pub fn from_json(object: &Value, origin: &Path) -> Result<Self> {
        let bad = |what: &str| format!("{}: \"wemoe\".{what}", origin.display());
        let experts: Vec<String> = object
            .get("experts")
            .and_then(Value::as_array)
            .with_context(|| bad("experts must be a list of names"))?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .with_context(|| bad("experts must be a list of names"))?;
        ensure!(!experts.is_empty(), "{}", bad("experts is empty"));
        if let Some(twice) = experts.iter().enumerate().find(|(i, e)| experts[..*i].contains(e)) {
            bail!("{} '{}' is named twice", bad("experts"), twice.1);
        }
        // Each field absent takes its default; present, it must be of its kind (not read as absent).
        let field = |key: &str| object.get(key).filter(|v| !v.is_null());
        let router_layers = match field("router_layers") {
            None => 2,
            Some(v) => {
                v.as_u64().filter(|&d| d <= 2).with_context(|| bad(&format!("router_layers {v}: must be 0, 1 or 2")))?
            }
        } as usize;
        let router_activation = match field("router_activation").map(|v| v.as_str().ok_or(v)) {
            None | Some(Ok("identity")) => RouterActivation::Identity,
            Some(Ok("softmax")) => RouterActivation::Softmax,
            Some(Ok(other)) => bail!("{} '{other}' (expected identity or softmax)", bad("router_activation")),
            Some(Err(v)) => bail!("{} {v} (expected identity or softmax)", bad("router_activation")),
        };
        let init_lambda = match field("init_lambda") {
            None => None,
            Some(v) => Some(v.as_f64().with_context(|| bad(&format!("init_lambda {v}: must be a number")))? as f32),
        };
        Ok(WemoeSpec { experts, router_layers, router_activation, init_lambda })
    }

    /// Recognises a WEMoE state dict without our config object (as FusionBench saves one): the router
    /// depth from the gate's keys, T from layer 0's task vectors, experts named `expert_{t}`.
    pub fn infer(store: &TensorStore) -> Option<Self> {
        let mlp = "vision_model.encoder.layers.0.mlp";
        if !store.contains(&format!("{mlp}.base_model.fc1.weight")) {
            return None;
        }
        let router_layers = GATE_KEYS.iter().position(|k| store.contains(&format!("{mlp}.gate.{k}")))?;
        let experts = (0..).take_while(|t| store.contains(&format!("{mlp}.task_vectors.{t}.fc1.weight"))).count();
        Some(WemoeSpec {
            experts: (0..experts).map(|t| format!("expert_{t}")).collect(),
            router_layers,
            router_activation: RouterActivation::Identity,
            init_lambda: None,
        })
    }

    /// Refuses a `"wemoe"` object (of `origin`, a config.json) that the model's tensors contradict: no WEMoE
    /// layer, another number of task vectors than experts named, or routers of another depth. Every command that
    /// opens the model (`info` too) then says so, instead of the first tensor that does not fit, or a description
    /// that does not match the file.
    pub fn check_tensors(&self, store: &TensorStore, origin: &Path) -> Result<()> {
        let found = Self::infer(store).with_context(|| {
            format!(
                "{}: has a \"wemoe\" object, but the model's tensors hold no WEMoE layer (no \
                 vision_model.encoder.layers.0.mlp.base_model.fc1.weight and gate)",
                origin.display()
            )
        })?;
        let (named, held) = (self.experts.len(), found.experts.len());
        ensure!(
            named == held,
            "{}: \"wemoe\".experts names {named} ({}), but the tensors hold {held} task vector{} per layer",
            origin.display(),
            self.experts.join(", "),
            if held == 1 { "" } else { "s" }
        );
        ensure!(
            self.router_layers == found.router_layers,
            "{}: \"wemoe\".router_layers is {}, but the routers' tensors are of depth {}",
            origin.display(),
            self.router_layers,
            found.router_layers
        );
        Ok(())
    }

    /// The `"wemoe"` object.
    pub fn to_json(&self) -> Value {
        json!({
            "experts": self.experts,
            "router_layers": self.router_layers,
            "router_activation": self.router_activation.name(),
            "init_lambda": self.init_lambda.map(json_f32),
        })
    }

    /// Number of experts, T.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }
}

/// A WEMoE router (FusionBench's `Depth_{0,1,2}_Gate`).
pub enum Router {
    /// Depth 0: input-independent coefficients, stored `[1, 1, T]`.
    Constant(Tensor),
    /// Depth 1: `fc(h)`.
    Linear(Linear),
    /// Depth 2: `fc2(relu(fc1(h)))`.
    Mlp {
        /// `[D, D]`.
        fc1: Linear,
        /// `[T, D]`.
        fc2: Linear,
    },
}

impl Router {
    fn load(be: &dyn Backend, src: &dyn WeightSource, gate: &str, depth: usize, d: usize, t: usize) -> Result<Self> {
        Ok(match depth {
            0 => Router::Constant(be.upload(src.get(&format!("{gate}.weight"), &[t])?.reshape(&[1, 1, t])?)?),
            1 => Router::Linear(Linear::load(be, src, &format!("{gate}.fc"), t, d, true)?),
            _ => Router::Mlp {
                fc1: Linear::load(be, src, &format!("{gate}.fc1"), d, d, true)?,
                fc2: Linear::load(be, src, &format!("{gate}.fc2"), t, d, true)?,
            },
        })
    }

    /// The merge coefficients of `h` `[B, N, D]`: `[B, T]`, or `[1, T]` for a depth-0 router.
    pub fn coefficients(&self, be: &dyn Backend, h: &Tensor, act: RouterActivation) -> Result<Tensor> {
        let softmax = act == RouterActivation::Softmax;
        match self {
            Router::Constant(w) => be.router_reduce(w, softmax),
            Router::Linear(fc) => head(be, fc, h, softmax),
            Router::Mlp { fc1, fc2 } => {
                let z = be.linear_act(h, &fc1.weight, fc1.bias.as_ref(), Activation::Relu)?;
                head(be, fc2, &z, softmax)
            }
        }
    }
}

/// A router's last layer and token mean, fused by the backend when the layer has a bias (FusionBench's do).
fn head(be: &dyn Backend, fc: &Linear, h: &Tensor, softmax: bool) -> Result<Tensor> {
    match &fc.bias {
        Some(b) => be.router_head(h, &fc.weight, b, softmax),
        None => be.router_reduce(&fc.forward(be, h)?, softmax),
    }
}

/// A WEMoE MLP: router, pretrained MLP and task vectors.
pub struct WemoeMlp {
    /// The router ("gate").
    pub gate: Router,
    /// Applied to the router's outputs before the token mean.
    pub router_activation: RouterActivation,
    /// `fc1`: pretrained `[I, D]` and task vectors.
    pub fc1: ExpertLinear,
    /// `fc2`: pretrained `[D, I]` and task vectors.
    pub fc2: ExpertLinear,
    /// The MLP's activation.
    pub activation: Activation,
}

impl WemoeMlp {
    /// Loads `{prefix}.gate.*`, `{prefix}.base_model.*` and `{prefix}.task_vectors.{t}.*`.
    pub fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        prefix: &str,
        c: &VisionConfig,
        spec: &WemoeSpec,
    ) -> Result<Self> {
        let (d, i, t) = (c.hidden_size, c.intermediate_size, spec.num_experts());
        ensure!(t > 0, "{prefix}: a WEMoE layer needs at least one expert, and the spec names none");
        let expert_linear = |name: &str, out: usize, inp: usize| -> Result<ExpertLinear> {
            let get = |key: String, shape: &[usize]| src.get(&key, shape);
            let vectors = |suffix: &str, shape: &[usize]| -> Result<Vec<Tensor>> {
                (0..t).map(|e| get(format!("{prefix}.task_vectors.{e}.{name}.{suffix}"), shape)).collect()
            };
            let prepared = be.prepare_expert_linear(
                get(format!("{prefix}.base_model.{name}.weight"), &[out, inp])?,
                get(format!("{prefix}.base_model.{name}.bias"), &[out])?,
                vectors("weight", &[out, inp])?,
                vectors("bias", &[out])?,
            )?;
            src.release(&format!("{prefix}.base_model.{name}.weight"));
            (0..t).for_each(|e| src.release(&format!("{prefix}.task_vectors.{e}.{name}.weight")));
            Ok(prepared)
        };
        Ok(WemoeMlp {
            gate: Router::load(be, src, &format!("{prefix}.gate"), spec.router_layers, d, t)?,
            router_activation: spec.router_activation,
            fc1: expert_linear("fc1", i, d)?,
            fc2: expert_linear("fc2", d, i)?,
            activation: c.hidden_act,
        })
    }

    /// The MLP of `h` `[B, N, D]` with merged weights, and the coefficients used: `[B, T]` per sample, or
    /// `[1, T]` when one merge served the batch (batch routing, or a depth-0 router).
    pub fn forward(&self, be: &dyn Backend, h: &Tensor, routing: Routing) -> Result<(Tensor, Tensor)> {
        let coefficients = self.coefficients(be, h, routing)?;
        Ok((self.mix(be, h, &coefficients)?, coefficients))
    }

    /// The merge coefficients for `h` `[B, N, D]` under `routing`: `[B, T]`, or `[1, T]` for one merge.
    pub fn coefficients(&self, be: &dyn Backend, h: &Tensor, routing: Routing) -> Result<Tensor> {
        let coefficients = self.gate.coefficients(be, h, self.router_activation)?;
        if routing == Routing::Batch && coefficients.shape()[0] > 1 {
            return be.mean_rows(&coefficients);
        }
        Ok(coefficients)
    }

    /// The MLP of `x` (`[B, N, D]`, or `[B, D]` for one token per sample) with the weights that `coefficients`
    /// merge: sample `b`'s rows with row `b`'s, or every row with the one row of `[1, T]`.
    pub fn mix(&self, be: &dyn Backend, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
        be.expert_mlp(x, coefficients, &self.fc1, &self.fc2, self.activation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;
    use crate::model::RandomWeights;

    /// A spec without experts is refused when the layer loads, naming the layer, instead of failing deep
    /// inside (it once panicked transposing the router's empty last layer).
    #[test]
    fn a_layer_without_experts_is_refused_by_name() {
        let spec = WemoeSpec {
            experts: Vec::new(),
            router_layers: 2,
            router_activation: RouterActivation::Identity,
            init_lambda: Some(0.3),
        };
        let c = VisionConfig::default();
        let err = WemoeMlp::load(&CpuBackend::new(), &RandomWeights::new(1), "layers.3.mlp", &c, &spec)
            .err()
            .expect("a layer without experts loaded");
        assert!(err.to_string().starts_with("layers.3.mlp: a WEMoE layer needs at least one expert"), "{err}");
    }

    #[test]
    fn a_config_field_of_the_wrong_kind_is_refused_not_taken_as_absent() {
        let read = |o: Value| WemoeSpec::from_json(&o, Path::new("config.json")).map_err(|e| e.to_string());
        let spec = read(json!({"experts": ["a", "b"], "router_layers": null})).unwrap();
        assert_eq!(
            (spec.router_layers, spec.router_activation, spec.init_lambda),
            (2, RouterActivation::Identity, None)
        );
        let spec = read(json!({"experts": ["a"], "router_layers": 0, "router_activation": "softmax"})).unwrap();
        assert_eq!((spec.router_layers, spec.router_activation), (0, RouterActivation::Softmax));
        for (object, culprit) in [
            (json!({"experts": ["a"], "router_layers": -1}), "router_layers -1: must be 0, 1 or 2"),
            (json!({"experts": ["a"], "router_layers": "1"}), "router_layers \"1\": must be 0, 1 or 2"),
            (json!({"experts": ["a"], "router_activation": 5}), "router_activation 5 (expected identity or softmax)"),
            (json!({"experts": ["a"], "init_lambda": "x"}), "init_lambda \"x\": must be a number"),
            (json!({"experts": ["a", "b", "a"]}), "experts 'a' is named twice"),
        ] {
            let err = read(object).unwrap_err();
            assert_eq!(err, format!("config.json: \"wemoe\".{culprit}"));
        }
    }

    #[test]
    fn init_lambda_is_written_as_given() {
        let spec = WemoeSpec {
            experts: vec!["a".into()],
            router_layers: 1,
            router_activation: RouterActivation::Softmax,
            init_lambda: Some(0.3),
        };
        assert_eq!(spec.to_json()["init_lambda"], json!(0.3), "not the f32's 0.30000001192092896");
    }
}
