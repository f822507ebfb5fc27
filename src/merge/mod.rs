//! Merging a pretrained CLIP vision model and T fine-tuned copies: WEMoE ("upscaling"), task arithmetic,
//! TIES-merging or weight averaging. The merge streams tensor by tensor from the memory maps into the output
//! file.
//!
//! WEMoE (REFERENCE.md section 2): every parameter outside the MLPs is merged by task arithmetic,
//! `θ0 + λ·Σ_t (θ_t − θ0)`; every layer's MLP becomes `base_model` (the pretrained MLP), `task_vectors.{t}`
//! (`θ_t − θ0` of its four tensors) and a freshly initialised `gate`, in FusionBench's state-dict layout.
//!
//! Layer-wise AdaMerging, which trains its coefficients on unlabeled data, is [`adamerging`]; [`AdaMerging`]
//! gives its merged model and coefficient gradients step by step.
//!
//! ```
//! use wemoe_engine::checkpoint::ModelDir;
//! use wemoe_engine::merge::{merge, Expert, MergeMethod, MergeOptions, TiesOptions};
//! use wemoe_engine::model::RouterActivation;
//!
//! // HF CLIP directories; here the bundled suite's small pretrained model and two of its experts.
//! let pretrained = ModelDir::open("assets/suite/pretrained".as_ref())?;
//! let experts = ["mnist", "digits"]
//!     .iter()
//!     .map(|t| {
//!         let model = ModelDir::open(format!("assets/suite/experts/{t}").as_ref())?;
//!         Ok(Expert { name: t.to_string(), model })
//!     })
//!     .collect::<anyhow::Result<Vec<_>>>()?;
//! let options = MergeOptions {
//!     method: MergeMethod::TiesMerging(TiesOptions::default()), // or Wemoe, TaskArithmetic, Average
//!     scaling: 0.3,
//!     router_layers: 2,
//!     router_activation: RouterActivation::Identity,
//!     seed: 0,
//! };
//! let out = std::env::temp_dir().join(format!("ties-merged-{}", std::process::id()));
//! let summary = merge(&pretrained, &experts, &options, &out, &mut |done, total| {
//!     eprint!("\r{done}/{total}");
//! })?;
//! assert_eq!(ModelDir::open(&out)?.store.names().count(), summary.tensors);
//! std::fs::remove_dir_all(&out)?;
//! # anyhow::Ok(())
//! ```

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::Value;

use crate::checkpoint::{ModelDir, StreamingWriter};
use crate::config::{json_f32, VisionConfig};
use crate::model::{gate_tensors, RouterActivation, WemoeSpec};
use crate::output::write_atomic;
use crate::partial::Partial;
use crate::rng::Rng;
use crate::tensor::Tensor;

mod adamerging;
mod ties;

pub use adamerging::{
    adamerging, check_adamerging_checkpoint, check_adamerging_out, parameter_order, read_coefficients, AdaMerging,
    AdaMergingOptions, AdaMergingStep, AdaMergingSummary, Coefficients, CoefficientsFile, Granularity,
    ADAMERGING_CHECKPOINT, COEFFICIENTS_FILE, TASK_WISE_COLUMN,
};
pub use ties::{TiesMergeFunc, TiesOptions, TiesStats};

/// How the experts are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MergeMethod {
    /// Weight-Ensembling Mixture of Experts: routers and per-sample merged MLPs.
    Wemoe,
    /// `θ0 + λ·Σ_t (θ_t − θ0)` for every parameter.
    TaskArithmetic,
    /// `θ0 + λ·TIES(τ_1 … τ_T)`: each task vector trimmed to its largest entries, signs elected, the
    /// agreeing entries merged (see [`TiesOptions`]).
    TiesMerging(TiesOptions),
    /// `(1/T)·Σ_t θ_t` for every parameter.
    Average,
}

impl MergeMethod {
    /// The name `--method` takes.
    pub fn name(&self) -> &'static str {
        match self {
            MergeMethod::Wemoe => "wemoe",
            MergeMethod::TaskArithmetic => "task-arithmetic",
            MergeMethod::TiesMerging(_) => "ties-merging",
            MergeMethod::Average => "average",
        }
    }
}

/// What `merge` is asked to do.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// The method.
    pub method: MergeMethod,
    /// λ for task arithmetic, TIES-merging and WEMoE's shared parameters, and the routers' initial bias.
    pub scaling: f32,
    /// WEMoE router depth (0, 1 or 2).
    pub router_layers: usize,
    /// WEMoE router activation.
    pub router_activation: RouterActivation,
    /// Seed of the routers' initialisation.
    pub seed: u64,
}

/// A fine-tuned model and its task name.
pub struct Expert {
    /// The task's name (kept in the output, in the order given).
    pub name: String,
    /// The fine-tuned model.
    pub model: ModelDir,
}

/// How an output tensor is computed.
enum Recipe {
    /// The method's merge of a shared vision tensor.
    Merged(String),
    /// TIES-merging of a vision tensor, with the whole model's statistics.
    Ties(String),
    /// The pretrained model's tensor as it is.
    Pretrained(String),
    /// `θ_t − θ0` of a tensor for one expert.
    TaskVector(String, usize),
    /// A router tensor's initial value.
    Gate(GateInit),
}

/// A router tensor's initialisation (FusionBench's `init_weight`).
enum GateInit {
    /// Normal(0, 0.01).
    Normal,
    /// Every element `value`.
    Constant(f32),
}

/// The architecture fields two models must share to be merged.
fn architecture_mismatch(a: &VisionConfig, b: &VisionConfig) -> Option<String> {
    let fields = [
        ("hidden_size", a.hidden_size, b.hidden_size),
        ("intermediate_size", a.intermediate_size, b.intermediate_size),
        ("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers),
        ("num_attention_heads", a.num_attention_heads, b.num_attention_heads),
        ("num_channels", a.num_channels, b.num_channels),
        ("image_size", a.image_size, b.image_size),
        ("patch_size", a.patch_size, b.patch_size),
    ];
    if let Some((name, x, y)) = fields.iter().find(|(_, x, y)| x != y) {
        return Some(format!("{name} {y} differs from the pretrained model's {x}"));
    }
    if a.hidden_act != b.hidden_act {
        return Some(format!("hidden_act {:?} differs from the pretrained model's {:?}", b.hidden_act, a.hidden_act));
    }
    // The merged model keeps the pretrained model's epsilon: an expert configured with another computed otherwise.
    (a.layer_norm_eps != b.layer_norm_eps).then(|| {
        format!("layer_norm_eps {:e} differs from the pretrained model's {:e}", b.layer_norm_eps, a.layer_norm_eps)
    })
}

/// The pretrained model's vision tensor names, after checking that every expert is a plain CLIP model of
/// the same architecture with every one of them at the same shape.
fn check_inputs(pretrained: &ModelDir, experts: &[Expert]) -> Result<Vec<String>> {
    ensure!(!experts.is_empty(), "no --expert given: merging needs at least one fine-tuned model");
    if pretrained.wemoe.is_some() {
        bail!("{}: the pretrained model is already a WEMoE model", pretrained.path.display());
    }
    let names: Vec<String> =
        pretrained.store.names().filter(|n| n.starts_with("vision_model.")).map(str::to_string).collect();
    let mut seen = std::collections::BTreeSet::new();
    for e in experts {
        let who = format!("expert '{}' ({})", e.name, e.model.path.display());
        ensure!(!e.name.is_empty(), "{who}: empty expert name");
        ensure!(seen.insert(e.name.as_str()), "expert name '{}' is given twice", e.name);
        ensure!(e.model.wemoe.is_none(), "{who}: is a WEMoE model, not a fine-tuned CLIP model");
        for name in &names {
            let want = pretrained.store.shape(name).unwrap_or_default();
            match e.model.store.shape(name) {
                None => bail!("{who}: missing tensor '{name}'"),
                Some(got) if got != want => bail!(
                    "{who}: tensor '{name}' has shape {got:?}, the pretrained model's has {want:?} (another architecture?)"
                ),
                Some(_) => {}
            }
        }
        if let Some(diff) = architecture_mismatch(&pretrained.config, &e.model.config) {
            bail!("{who}: {diff}");
        }
    }
    Ok(names)
}

/// `vision_model.encoder.layers.{l}.mlp.{fc1|fc2}.{weight|bias}` → (layer prefix `...mlp`, `fc1.weight`).
fn split_mlp(name: &str) -> Option<(&str, &str)> {
    let (prefix, leaf) = name.split_at(name.find(".mlp.")? + 4);
    let leaf = &leaf[1..];
    matches!(leaf, "fc1.weight" | "fc1.bias" | "fc2.weight" | "fc2.bias").then_some((prefix, leaf))
}

/// Every output tensor: name, shape, recipe.
fn plan(
    pretrained: &ModelDir,
    names: &[String],
    experts: usize,
    opts: &MergeOptions,
) -> Vec<(String, Vec<usize>, Recipe)> {
    let shape = |n: &str| pretrained.store.shape(n).unwrap_or_default().to_vec();
    let mut out = Vec::new();
    for name in names {
        match split_mlp(name) {
            Some((mlp, leaf)) if opts.method == MergeMethod::Wemoe => {
                out.push((format!("{mlp}.base_model.{leaf}"), shape(name), Recipe::Pretrained(name.clone())));
                for t in 0..experts {
                    out.push((
                        format!("{mlp}.task_vectors.{t}.{leaf}"),
                        shape(name),
                        Recipe::TaskVector(name.clone(), t),
                    ));
                }
            }
            _ if matches!(opts.method, MergeMethod::TiesMerging(_)) => {
                out.push((name.clone(), shape(name), Recipe::Ties(name.clone())))
            }
            _ => out.push((name.clone(), shape(name), Recipe::Merged(name.clone()))),
        }
    }
    if opts.method == MergeMethod::Wemoe {
        let (d, t, lambda) = (pretrained.config.hidden_size, experts, opts.scaling);
        for l in 0..pretrained.config.num_hidden_layers {
            let gate = format!("vision_model.encoder.layers.{l}.mlp.gate");
            for (leaf, s) in gate_tensors(opts.router_layers, d, t) {
                // FusionBench's init: matrices Normal(0, 0.01), the hidden bias 0, the output (or depth-0) λ.
                let init = match leaf {
                    "fc1.bias" => GateInit::Constant(0.0),
                    _ if s.len() == 2 => GateInit::Normal,
                    _ => GateInit::Constant(lambda),
                };
                out.push((format!("{gate}.{leaf}"), s, Recipe::Gate(init)));
            }
        }
    }
    for extra in ["visual_projection.weight", "logit_scale"] {
        if pretrained.store.contains(extra) {
            out.push((extra.to_string(), shape(extra), Recipe::Pretrained(extra.to_string())));
        }
    }
    out
}

/// Computes one output tensor.
fn compute(
    name: &str,
    shape: &[usize],
    recipe: &Recipe,
    pretrained: &ModelDir,
    experts: &[Expert],
    opts: &MergeOptions,
    ties: Option<&TiesStats>,
) -> Result<Vec<f32>> {
    let load = |m: &ModelDir, n: &str| -> Result<Vec<f32>> {
        let shape = m.store.shape(n).unwrap_or_default().to_vec();
        Ok(m.store.get(n, &shape)?.host()?.to_vec())
    };
    Ok(match recipe {
        Recipe::Pretrained(src) => load(pretrained, src)?,
        Recipe::TaskVector(src, t) => {
            let base = pretrained.store.get(src, shape)?;
            let mut v = load(&experts[*t].model, src)?;
            v.iter_mut().zip(base.host()?).for_each(|(v, b)| *v -= b);
            v
        }
        Recipe::Ties(src) => {
            let (MergeMethod::TiesMerging(o), Some(stats)) = (opts.method, ties) else {
                bail!("internal: a TIES tensor '{src}' without TIES's statistics");
            };
            let (theta0, taus) = ties::task_vectors(pretrained, experts, src)?;
            ties::ties_merge(theta0.host()?, taus, stats, o.merge_func, opts.scaling)
        }
        Recipe::Merged(src) => {
            let base = load(pretrained, src)?;
            let thetas = experts.par_iter().map(|e| e.model.store.get(src, shape)).collect::<Result<Vec<Tensor>>>()?;
            let thetas = thetas.iter().map(Tensor::host).collect::<Result<Vec<&[f32]>>>()?;
            // In FusionBench's order: the sum of the task vectors (or models), then the scaling. Each element
            // adds the experts in order, so chunks of elements run in parallel with the same result.
            const CHUNK: usize = 1 << 14;
            let mut out = vec![0.0f32; base.len()];
            out.par_chunks_mut(CHUNK).zip(base.par_chunks(CHUNK)).enumerate().for_each(|(c, (out, base))| {
                let at = c * CHUNK..c * CHUNK + out.len();
                for theta in &thetas {
                    match opts.method {
                        MergeMethod::Average => out.iter_mut().zip(&theta[at.clone()]).for_each(|(a, x)| *a += x),
                        _ => out.iter_mut().zip(&theta[at.clone()]).zip(base).for_each(|((a, x), b)| *a += x - b),
                    }
                }
                match opts.method {
                    MergeMethod::Average => out.iter_mut().for_each(|a| *a /= experts.len() as f32),
                    _ => out.iter_mut().zip(base).for_each(|(a, b)| *a = b + *a * opts.scaling),
                }
            });
            experts.iter().for_each(|e| e.model.store.release(src));
            out
        }
        Recipe::Gate(GateInit::Constant(v)) => vec![*v; shape.iter().product()],
        Recipe::Gate(GateInit::Normal) => {
            // One stream per tensor, from the seed and the tensor's name: independent of the write order.
            let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            Rng::new(opts.seed ^ hash).normal_vec(shape.iter().product(), 0.0, 0.01)
        }
    })
}

/// The output's config.json.
fn output_config(pretrained: &ModelDir, experts: &[Expert], opts: &MergeOptions) -> Value {
    let mut config = pretrained.config.to_json();
    let obj = config.as_object_mut().expect("to_json gives an object");
    obj.insert("model_type".into(), "clip_vision_model".into());
    obj.insert("architectures".into(), serde_json::json!(["CLIPVisionModel"]));
    if opts.method == MergeMethod::Wemoe {
        let spec = WemoeSpec {
            experts: experts.iter().map(|e| e.name.clone()).collect(),
            router_layers: opts.router_layers,
            router_activation: opts.router_activation,
            init_lambda: Some(opts.scaling),
        };
        obj.insert("wemoe".into(), spec.to_json());
    }
    obj.insert("merge".into(), provenance(experts, opts));
    config
}

/// How a model was made, kept in its `config.json` under `"merge"`: the tool, the method, its settings and
/// the experts in order.
fn provenance(experts: &[Expert], opts: &MergeOptions) -> Value {
    let mut merge = serde_json::json!({
        "tool": format!("wemoe-engine {}", env!("CARGO_PKG_VERSION")),
        "method": opts.method.name(),
        "experts": experts.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
    });
    let obj = merge.as_object_mut().expect("an object");
    if opts.method != MergeMethod::Average {
        obj.insert("scaling".into(), json_f32(opts.scaling));
    }
    if let MergeMethod::TiesMerging(t) = opts.method {
        obj.insert("threshold".into(), t.threshold.into());
        obj.insert("merge_func".into(), t.merge_func.name().into());
    }
    if opts.method == MergeMethod::Wemoe {
        obj.insert("router_layers".into(), opts.router_layers.into());
        obj.insert("router_activation".into(), opts.router_activation.name().into());
        obj.insert("seed".into(), opts.seed.into());
    }
    merge
}

/// What a merge wrote.
pub struct MergeSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: usize,
    /// TIES-merging's whole-model statistics, for that method.
    pub ties: Option<TiesStats>,
}

/// Merges into the new directory `out` (which must not exist), calling `progress(done, total)` per tensor.
/// Everything is written under a temporary name beside `out` and renamed at the end.
pub fn merge(
    pretrained: &ModelDir,
    experts: &[Expert],
    opts: &MergeOptions,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<MergeSummary> {
    ensure!(opts.scaling.is_finite(), "--scaling must be a finite number");
    ensure!(opts.router_layers <= 2, "--router-layers must be 0, 1 or 2");
    if let MergeMethod::TiesMerging(o) = opts.method {
        o.keep_fraction()?;
    }
    // An empty folder is taken as new: the finished model is renamed over it.
    if out.exists() && !crate::output::is_empty_dir(out) {
        bail!("{}: already exists; choose a new --out directory", out.display());
    }
    let names = check_inputs(pretrained, experts)?;
    let plan = plan(pretrained, &names, experts.len(), opts);
    // TIES's statistics read every tensor up to three times before the first is written.
    let mut reads = 0;
    let ties = match opts.method {
        MergeMethod::TiesMerging(o) => Some(ties::ties_stats(pretrained, experts, &names, &o, &mut |done, total| {
            reads = total;
            progress(done, total + plan.len());
        })?),
        _ => None,
    };
    let partial = temporary_dir(out)?;
    let tmp = partial.path();
    let config = serde_json::to_string_pretty(&output_config(pretrained, experts, opts))?;
    write_atomic(&tmp.join("config.json"), config.as_bytes())?;
    let preprocessor = pretrained.path.join("preprocessor_config.json");
    if preprocessor.exists() {
        std::fs::copy(&preprocessor, tmp.join("preprocessor_config.json"))
            .with_context(|| format!("{}: cannot copy", preprocessor.display()))?;
    }
    let shapes = plan.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let mut writer = StreamingWriter::create(&tmp.join("model.safetensors"), shapes)?;
    let mut parameters = 0;
    for (i, (name, shape, recipe)) in plan.iter().enumerate() {
        let values = compute(name, shape, recipe, pretrained, experts, opts, ties.as_ref())?;
        writer.write(name, &values)?;
        parameters += values.len();
        if let Recipe::Merged(src) | Recipe::Ties(src) | Recipe::Pretrained(src) | Recipe::TaskVector(src, _) = recipe {
            pretrained.store.release(src);
            if let Recipe::TaskVector(_, t) = recipe {
                experts[*t].model.store.release(src);
            }
        }
        progress(reads + i + 1, reads + plan.len());
    }
    writer.finish()?;
    // An error above returns early and drops the partial folder, which removes it.
    partial.finish(out).map_err(|e| {
        if out.exists() && !crate::output::is_empty_dir(out) {
            // Absent or empty at the start (checked above): something else wrote there meanwhile, whose files stay.
            anyhow!(
                "{}: another program wrote there while this merge ran; nothing written, choose a new --out",
                out.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("{}: cannot create", out.display()))
        }
    })?;
    Ok(MergeSummary { tensors: plan.len(), parameters, ties })
}

/// A fresh, empty folder beside `out` for writing before the final rename.
fn temporary_dir(out: &Path) -> Result<Partial> {
    let name = out.file_name().with_context(|| format!("{}: not a directory name", out.display()))?;
    crate::output::check_folder_target("--out", out)?;
    let parent = crate::output::parent_folder(out);
    let partial = Partial::beside(&parent.join(name));
    std::fs::create_dir(partial.path()).with_context(|| {
        format!("{}: cannot create (its partial folder {})", out.display(), partial.path().display())
    })?;
    Ok(partial)
}

#[cfg(test)]
mod tests {
    use super::split_mlp;

    #[test]
    fn mlp_tensors_are_recognised() {
        assert_eq!(
            split_mlp("vision_model.encoder.layers.11.mlp.fc2.bias"),
            Some(("vision_model.encoder.layers.11.mlp", "fc2.bias"))
        );
        assert_eq!(split_mlp("vision_model.encoder.layers.0.self_attn.q_proj.weight"), None);
        assert_eq!(split_mlp("vision_model.encoder.layers.0.mlp.gate.fc1.weight"), None);
    }
}
