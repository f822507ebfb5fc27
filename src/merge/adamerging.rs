//! Layer-wise AdaMerging (Yang et al., ICLR 2024), as FusionBench's `CLIPLayerWiseAdaMergingAlgorithm`
//! computes it: one coefficient per expert and per parameter tensor of the vision tower, the model
//! `θ_p = θ0_p + Σ_t λ[t, p]·τ_t,p`, and the coefficients trained by Adam on the summed entropy of unlabeled
//! test batches, one per task per step, as WEMoE's routers are. Task-wise AdaMerging
//! (`CLIPTaskWiseAdaMergingAlgorithm`, [`Granularity::TaskWise`]) shares one coefficient per expert across
//! every tensor, whose gradient is the sum of the tensors' own.
//!
//! The gradient of the loss with respect to `λ[t, p]` is `⟨τ_t,p, ∂L/∂θ_p⟩`: the tape gives `∂L/∂θ_p` for
//! every parameter ([`Trainable::Everything`]), and the backend contracts it with the task vectors
//! ([`Backend::task_vector_dots`]). Each step merges the model anew ([`Backend::merge_task_vectors`]), as
//! FusionBench's `merge_weights` does after each optimiser step. On the CPU the task vectors are read from the
//! experts' memory maps for each of the two and never held; on a GPU they are uploaded once and held.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{check_inputs, Expert};
use crate::adapt::{
    check_restored, check_resumable, finite, finite_after_update, model_not_written, recorded_path, Adam,
    CheckpointState, TaskSampler,
};
use crate::autograd::{entropy_loss_and_gradients, TaskBatch, Trainable};
use crate::checkpoint::{ModelDir, SafetensorsFile, StreamingWriter};
use crate::config::{json_f32, VisionConfig};
use crate::data::Dataset;
use crate::device::{Backend, Device};
use crate::model::{ClipVision, Heads, ImageEncoder, Routing, WeightSource};
use crate::ops::task_vectors::merge_rounded;
use crate::output::{write_atomic, write_safetensors_with_metadata, NamedTensor};
use crate::partial::Partial;
use crate::run_lock::RunLock;
use crate::tensor::Tensor;

/// How many coefficients each expert gets: FusionBench's two CLIP AdaMerging algorithms (`name` in its
/// `adamerging/clip.yaml`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Granularity {
    /// One per parameter tensor of the vision tower (`clip_layer_wise_adamerging`, the default).
    #[default]
    LayerWise,
    /// One for the whole tower (`clip_task_wise_adamerging`).
    TaskWise,
}

impl Granularity {
    /// As the command line and `config.json` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Granularity::LayerWise => "layer-wise",
            Granularity::TaskWise => "task-wise",
        }
    }
}

/// The one column of task-wise coefficients, which every parameter tensor shares.
pub const TASK_WISE_COLUMN: &str = "task_wise";

/// What AdaMerging is asked to do (FusionBench's `adamerging/clip.yaml` defaults).
#[derive(Clone, Debug)]
pub struct AdaMergingOptions {
    /// Every coefficient's initial value (`init_values`, 0.3).
    pub init: f32,
    /// Adam steps (`max_steps`, 1000).
    pub steps: u64,
    /// Adam's learning rate (1e-3; betas 0.9, 0.999, ε 1e-8 as torch's defaults).
    pub lr: f64,
    /// Images per task per step (16).
    pub batch_size: usize,
    /// Seed of the task streams.
    pub seed: u64,
    /// Steps between checkpoints in the output directory.
    pub checkpoint_every: u64,
    /// Clamp every coefficient to [0, 1] where the merge uses it (`clamp_weights`, false): a coefficient
    /// outside that range then gets no gradient, as through torch's `clamp`.
    pub clamp: bool,
    /// A coefficient per expert and parameter tensor, or per expert.
    pub granularity: Granularity,
}

impl Default for AdaMergingOptions {
    fn default() -> Self {
        AdaMergingOptions {
            init: 0.3,
            steps: 1000,
            lr: 1e-3,
            batch_size: 16,
            seed: 0,
            checkpoint_every: 100,
            clamp: false,
            granularity: Granularity::LayerWise,
        }
    }
}

impl AdaMergingOptions {
    /// Refuses settings no run can take (a command checks them before it opens anything).
    pub fn check(&self) -> Result<()> {
        ensure!(self.init.is_finite(), "--scaling (the coefficients' initial value) must be a finite number");
        ensure!(self.steps > 0, "--steps must be positive");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a positive number, got {}", self.lr);
        ensure!(self.batch_size > 0, "--batch-size must be positive");
        ensure!(self.checkpoint_every > 0, "--checkpoint-every must be positive");
        Ok(())
    }
}

/// Refuses an `--out` that a run could not take: one holding anything but AdaMerging's checkpoint, or that
/// checkpoint without `--resume`. An empty folder (made ahead, or left by a run killed before its first
/// checkpoint) is taken as new.
pub fn check_adamerging_out(out: &Path, resume: bool) -> Result<()> {
    if !out.exists() || crate::output::is_empty_dir(out) {
        return Ok(());
    }
    if !out.join(ADAMERGING_CHECKPOINT).exists() {
        bail!("{}: already exists; choose a new --out directory", out.display());
    }
    if !resume {
        bail!("{}: holds a checkpoint; pass --resume to continue it, or choose another --out", out.display());
    }
    Ok(())
}

/// Refuses a `--resume` that the checkpoint in `out` could not serve: one with other arguments than it was made
/// with, or fewer `--steps` than it has done. It reads the checkpoint's metadata only, so that the command
/// line can refuse before the device opens; [`check_adamerging_out`] covers the folder itself.
pub fn check_adamerging_checkpoint(
    out: &Path,
    pretrained: &Path,
    experts: &[Expert],
    heads: &Path,
    tasks: &[(String, PathBuf)],
    opts: &AdaMergingOptions,
) -> Result<()> {
    let checkpoint = out.join(ADAMERGING_CHECKPOINT);
    if !checkpoint.exists() {
        return Ok(());
    }
    let tasks = tasks.iter().map(|(n, p)| (n.as_str(), p.as_path()));
    check_resumable(&checkpoint, &fingerprint(pretrained, experts, heads, tasks, opts), opts.steps, with_later_defaults)
}

/// The file beside the merged model that holds the trained coefficients.
pub const COEFFICIENTS_FILE: &str = "adamerging_weights.safetensors";

/// The checkpoint file inside the output directory.
pub const ADAMERGING_CHECKPOINT: &str = "adamerging-checkpoint.safetensors";

/// The vision tower's parameter tensors in the order of `named_parameters()` of HF's `CLIPVisionModel`: the
/// columns of FusionBench's `merge_weight` `[T, P]`.
pub fn parameter_order(config: &VisionConfig) -> Vec<String> {
    let mut names: Vec<String> =
        ["embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"]
            .iter()
            .map(|n| n.to_string())
            .collect();
    let affine = |prefix: &str| [format!("{prefix}.weight"), format!("{prefix}.bias")];
    names.extend(affine("pre_layrnorm"));
    for l in 0..config.num_hidden_layers {
        let at = |n: &str| format!("encoder.layers.{l}.{n}");
        for module in ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1"]
        {
            names.extend(affine(&at(module)));
        }
        for module in ["mlp.fc1", "mlp.fc2", "layer_norm2"] {
            names.extend(affine(&at(module)));
        }
    }
    names.extend(affine("post_layernorm"));
    names.into_iter().map(|n| format!("vision_model.{n}")).collect()
}

/// The coefficients `λ[t, p]`: per parameter tensor (or, task-wise, for all of them), one per expert.
#[derive(Clone, Debug, PartialEq)]
pub struct Coefficients {
    /// The parameter tensors, in [`parameter_order`]; task-wise, [`TASK_WISE_COLUMN`] alone.
    pub names: Vec<String>,
    /// Per column, its coefficient for each expert in order.
    pub values: BTreeMap<String, Vec<f32>>,
}

impl Coefficients {
    /// Every coefficient `init`.
    pub fn constant(names: Vec<String>, experts: usize, init: f32) -> Self {
        let values = names.iter().map(|n| (n.clone(), vec![init; experts])).collect();
        Coefficients { names, values }
    }

    /// FusionBench's `merge_weight` layout: `[T, P]`, row-major.
    pub fn to_matrix(&self, experts: usize) -> Vec<f32> {
        (0..experts).flat_map(|t| self.names.iter().map(move |n| self.values[n][t])).collect()
    }
}

/// The pretrained model, the experts and the derived parameter order: what every step reads. On a GPU, also
/// every parameter's pretrained tensor and task vectors, held on the device for the whole run.
pub struct AdaMerging<'a> {
    pretrained: &'a ModelDir,
    experts: &'a [Expert],
    names: Vec<String>,
    held: Option<BTreeMap<String, Held>>,
    clamp: bool,
    granularity: Granularity,
}

/// A parameter's pretrained tensor and its task vectors on the device.
struct Held {
    theta0: Tensor,
    taus: Vec<Tensor>,
}

/// The pretrained tensor `name` and every expert's task vector of it, `θ_t − θ0` in f32, their pages of the
/// maps dropped after (as every merge does). Keeping them mapped across steps left a B/32 step's time as it was
/// (16.4–16.8 s against 16.7–16.9 s at fb8816d) and took the peak from 2.1 to 4.8 GB (BENCHMARKS.md).
fn task_vectors(pretrained: &ModelDir, experts: &[Expert], name: &str) -> Result<(Tensor, Vec<Tensor>)> {
    let (theta0, taus) = super::ties::task_vectors(pretrained, experts, name)?;
    let shape = theta0.shape().to_vec();
    let taus = taus.into_iter().map(|t| Tensor::from_vec(&shape, t)).collect::<Result<_>>()?;
    Ok((theta0, taus))
}

/// The model's tensors merged at some coefficients, as a [`WeightSource`] for the model's loader, which takes
/// each tensor once: it is handed over, not copied.
struct MergedWeights(Mutex<BTreeMap<String, Tensor>>);

impl WeightSource for MergedWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mut tensors = self.0.lock().map_err(|_| anyhow!("the merged tensors' lock is poisoned"))?;
        let t = tensors.remove(name).with_context(|| format!("the merged model has no tensor '{name}'"))?;
        ensure!(t.shape() == shape, "merged tensor '{name}' has shape {:?}, expected {shape:?}", t.shape());
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.lock().map(|t| t.contains_key(name)).unwrap_or(false)
    }
}

impl<'a> AdaMerging<'a> {
    /// Checks that the experts fit the pretrained model (as every merge does) and that it has every
    /// parameter tensor of a CLIP vision tower. On a GPU backend the pretrained tensors and the task vectors
    /// are then uploaded, once: `(T + 1)` times the vision tower's size in device memory, against a merge
    /// and a contraction that would otherwise read every expert from the host at every step.
    pub fn new(be: &dyn Backend, pretrained: &'a ModelDir, experts: &'a [Expert]) -> Result<Self> {
        check_inputs(pretrained, experts)?;
        let names = parameter_order(&pretrained.config);
        for name in &names {
            ensure!(pretrained.store.contains(name), "{}: missing tensor '{name}'", pretrained.path.display());
        }
        let held = if be.device() == Device::Cpu {
            None
        } else {
            let mut held = BTreeMap::new();
            for name in &names {
                let (theta0, taus) = task_vectors(pretrained, experts, name)?;
                let mib = ((experts.len() + 1) * theta0.numel() * 4) as f64 / (1 << 20) as f64;
                let hold =
                    || -> Result<Held> { Ok(Held { theta0: be.upload(theta0)?, taus: be.hold_task_vectors(taus)? }) };
                let h = hold().with_context(|| {
                    format!("holding '{name}' and its {} task vectors on {} ({mib:.1} MiB)", experts.len(), be.device())
                })?;
                held.insert(name.clone(), h);
            }
            Some(held)
        };
        Ok(AdaMerging { pretrained, experts, names, held, clamp: false, granularity: Granularity::LayerWise })
    }

    /// The same run with every coefficient clamped to [0, 1] where the merge uses it when `clamp`
    /// (FusionBench's `clamp_weights`): the merge takes the clamped values, and a coefficient outside the
    /// range gets a zero gradient (torch's `clamp` passes the gradient on the closed range).
    pub fn with_clamp(self, clamp: bool) -> Self {
        AdaMerging { clamp, ..self }
    }

    /// The same run with `granularity`'s coefficients (layer-wise by default).
    pub fn with_granularity(self, granularity: Granularity) -> Self {
        AdaMerging { granularity, ..self }
    }

    /// The coefficients' column of parameter tensor `name`.
    fn column<'n>(&self, name: &'n str) -> &'n str {
        match self.granularity {
            Granularity::LayerWise => name,
            Granularity::TaskWise => TASK_WISE_COLUMN,
        }
    }

    /// The coefficients of parameter tensor `name` as the merge uses them.
    fn used(&self, coefficients: &Coefficients, name: &str) -> Vec<f32> {
        let values = &coefficients.values[self.column(name)];
        if self.clamp {
            values.iter().map(|l| l.clamp(0.0, 1.0)).collect()
        } else {
            values.clone()
        }
    }

    /// The parameter tensors, in FusionBench's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Every coefficient `init`.
    pub fn initial(&self, init: f32) -> Coefficients {
        let columns = match self.granularity {
            Granularity::LayerWise => self.names.clone(),
            Granularity::TaskWise => vec![TASK_WISE_COLUMN.to_string()],
        };
        Coefficients::constant(columns, self.experts.len(), init)
    }

    /// One merged parameter tensor on the host, from the maps (what the output is written from).
    fn merged(&self, name: &str, coefficients: &Coefficients) -> Result<Vec<f32>> {
        let (theta0, taus) = task_vectors(self.pretrained, self.experts, name)?;
        let taus = taus.iter().map(Tensor::host).collect::<Result<Vec<_>>>()?;
        Ok(merge_rounded(theta0.host()?, &taus, &self.used(coefficients, name)))
    }

    /// One merged parameter tensor on `be`: from the held tensors where they are, else from the maps.
    fn merged_on(&self, be: &dyn Backend, name: &str, coefficients: &Coefficients) -> Result<Tensor> {
        let lambdas = self.used(coefficients, name);
        match self.held.as_ref().and_then(|h| h.get(name)) {
            Some(h) => be.merge_task_vectors(&h.theta0, &h.taus, &lambdas),
            None => {
                let (theta0, taus) = task_vectors(self.pretrained, self.experts, name)?;
                be.merge_task_vectors(&theta0, &taus, &lambdas)
            }
        }
    }

    /// The vision tower merged at `coefficients`, on `be`, with the pretrained model's projection and
    /// `logit_scale` (which the merge leaves as they are).
    pub fn model(&self, be: &dyn Backend, coefficients: &Coefficients) -> Result<ImageEncoder> {
        let mut encoder = ImageEncoder::load_without_layers(be, self.pretrained)?;
        encoder.vision = self.vision(be, coefficients)?;
        Ok(encoder)
    }

    /// The vision tower alone merged at `coefficients`: what a step replaces in its [`model`](Self::model).
    pub fn vision(&self, be: &dyn Backend, coefficients: &Coefficients) -> Result<ClipVision> {
        let mut tensors = BTreeMap::new();
        for name in &self.names {
            tensors.insert(name.clone(), self.merged_on(be, name, coefficients)?);
        }
        ClipVision::load(be, &MergedWeights(Mutex::new(tensors)), &self.pretrained.config, None)
    }

    /// The loss of `model` (merged at `coefficients`) on `batches`, the sum over tasks of the batch-mean
    /// entropy, and its gradient with respect to every coefficient: `⟨τ_t,p, ∂L/∂θ_p⟩`, summed in f64 (task-wise,
    /// also over the tensors `p`; zero for a coefficient the clamp holds at 0 or 1).
    pub fn loss_and_gradient(
        &self,
        be: &dyn Backend,
        model: &ImageEncoder,
        coefficients: &Coefficients,
        heads: &Heads,
        batches: &[TaskBatch],
    ) -> Result<(f64, BTreeMap<String, Vec<f32>>)> {
        let classifier = heads.classifier(model, &self.pretrained.path)?;
        let (loss, grads) =
            entropy_loss_and_gradients(be, model, &classifier, batches, Routing::Batch, Trainable::Everything)?;
        let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for name in &self.names {
            let g = grads.get(name).ok_or_else(|| anyhow!("internal: no gradient reached '{name}'"))?;
            let dots = match self.held.as_ref().and_then(|h| h.get(name)) {
                Some(h) => be.task_vector_dots(&h.taus, g)?,
                None => be.task_vector_dots(&task_vectors(self.pretrained, self.experts, name)?.1, g)?,
            };
            // Task-wise, the tensors' contractions add up in parameter order.
            let sum = out.entry(self.column(name).to_string()).or_insert_with(|| vec![0.0; dots.len()]);
            sum.iter_mut().zip(&dots).for_each(|(s, &d)| *s += d as f64);
        }
        let mut out: BTreeMap<String, Vec<f32>> =
            out.into_iter().map(|(k, v)| (k, v.into_iter().map(|d| d as f32).collect())).collect();
        if self.clamp {
            for (column, dots) in &mut out {
                for (d, l) in dots.iter_mut().zip(&coefficients.values[column]) {
                    if !(0.0..=1.0).contains(l) {
                        *d = 0.0;
                    }
                }
            }
        }
        Ok((loss, out))
    }
}

/// One step's report, for progress.
pub struct AdaMergingStep {
    /// Steps done (1-based).
    pub step: u64,
    /// Steps in all.
    pub steps: u64,
    /// The step's loss, at the coefficients before the step.
    pub loss: f64,
}

/// What an AdaMerging run wrote.
pub struct AdaMergingSummary {
    /// Tensors written to the model.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: usize,
    /// The trained coefficients.
    pub coefficients: Coefficients,
}

/// The arguments a resumed run must share with its checkpoint's. The step count may grow: the rate is
/// constant.
fn fingerprint<'a>(
    pretrained: &Path,
    experts: &[Expert],
    heads: &Path,
    tasks: impl IntoIterator<Item = (&'a str, &'a Path)>,
    o: &AdaMergingOptions,
) -> Value {
    let experts: Vec<Value> = experts.iter().map(|e| json!([e.name, recorded_path(&e.model.path)])).collect();
    let tasks: Vec<Value> = tasks.into_iter().map(|(n, p)| json!([n, recorded_path(p)])).collect();
    json!({
        "pretrained": recorded_path(pretrained), "experts": experts,
        "heads": recorded_path(heads), "tasks": tasks,
        "init": o.init, "lr": o.lr, "batch_size": o.batch_size, "seed": o.seed,
        "clamp_weights": o.clamp, "granularity": o.granularity.name(),
    })
}

/// A checkpoint's fingerprint with the options that came later at the values every earlier run had.
fn with_later_defaults(mut saved: Value) -> Value {
    if let Some(o) = saved.as_object_mut() {
        o.entry("clamp_weights").or_insert(false.into());
        o.entry("granularity").or_insert(Granularity::LayerWise.name().into());
    }
    saved
}

/// `values` by name as one `[T, P]` matrix in `names`' order (zeros for a name without values).
fn matrix(names: &[String], experts: usize, values: impl Fn(&str) -> Option<Vec<f32>>) -> Vec<f32> {
    let columns: Vec<Vec<f32>> = names.iter().map(|n| values(n).unwrap_or_else(|| vec![0.0; experts])).collect();
    (0..experts).flat_map(|t| columns.iter().map(move |c| c[t])).collect()
}

fn save_checkpoint(path: &Path, state: &CheckpointState, c: &Coefficients, adam: &Adam, experts: usize) -> Result<()> {
    let shape = vec![experts, c.names.len()];
    let moment = |which: usize| {
        matrix(&c.names, experts, |n| adam.moments.get(n).map(|(m, v)| if which == 0 { m.clone() } else { v.clone() }))
    };
    let tensors = [
        NamedTensor { name: "coefficients".into(), shape: shape.clone(), values: c.to_matrix(experts) },
        NamedTensor { name: "adam.m".into(), shape: shape.clone(), values: moment(0) },
        NamedTensor { name: "adam.v".into(), shape, values: moment(1) },
    ];
    let meta = BTreeMap::from([("state".to_string(), serde_json::to_string(state)?)]);
    write_safetensors_with_metadata(path, &tensors, meta)
}

/// Reads a checkpoint into `c` and `adam` (its arguments and step checked by [`check_resumable`] first).
fn load_checkpoint(path: &Path, c: &mut Coefficients, adam: &mut Adam, experts: usize) -> Result<CheckpointState> {
    let file = SafetensorsFile::open(path)?;
    let state = CheckpointState::of(&file, path)?;
    let read = |key: &str| -> Result<Vec<f32>> {
        let values = file.f32(key)?.host()?.to_vec();
        ensure!(values.len() == experts * c.names.len(), "{}: '{key}' does not fit the models", path.display());
        Ok(values)
    };
    let (values, m, v) = (read("coefficients")?, read("adam.m")?, read("adam.v")?);
    let p = c.names.len();
    let column = |all: &[f32], i: usize| (0..experts).map(|t| all[t * p + i]).collect::<Vec<f32>>();
    for (i, name) in c.names.iter().enumerate() {
        c.values.insert(name.clone(), column(&values, i));
        if state.adam_step > 0 {
            adam.moments.insert(name.clone(), (column(&m, i), column(&v, i)));
        }
    }
    adam.step = state.adam_step;
    Ok(state)
}

/// Trains the coefficients on `tasks` (names with their heads in `heads`, and unlabeled data) and writes the
/// merged model into `out`, with the coefficients in [`COEFFICIENTS_FILE`]. Every `checkpoint_every` steps
/// the coefficients, Adam's state and the task streams go to [`ADAMERGING_CHECKPOINT`] in `out`; with
/// `resume`, a run continues from it and ends with the same coefficients as one uninterrupted run. Each file
/// is written under a temporary name and renamed; a run that fails before its first checkpoint removes the
/// `out` it created. The run holds `out` while it lives ([`RunLock`]): a second run given the same folder
/// meanwhile is refused.
#[allow(clippy::too_many_arguments)]
pub fn adamerging(
    be: &dyn Backend,
    pretrained: &ModelDir,
    experts: &[Expert],
    heads: &Heads,
    tasks: &[String],
    data: &[Dataset],
    opts: &AdaMergingOptions,
    out: &Path,
    resume: bool,
    progress: &mut dyn FnMut(AdaMergingStep),
) -> Result<AdaMergingSummary> {
    opts.check()?;
    ensure!(!tasks.is_empty(), "adamerging needs at least one --task with unlabeled data");
    ensure!(tasks.len() == data.len(), "internal: {} tasks, {} datasets", tasks.len(), data.len());
    for (name, d) in tasks.iter().zip(data) {
        heads.head(name)?;
        ensure!(!d.is_empty(), "--task {name}: {} has no images", d.origin().display());
    }
    let run = AdaMerging::new(be, pretrained, experts)?.with_clamp(opts.clamp).with_granularity(opts.granularity);
    check_adamerging_out(out, resume)?;
    crate::output::check_folder_target("--out", out)?;
    // A folder this run makes goes again if it fails or is interrupted before its first checkpoint (`made`'s drop);
    // one made ahead stays, as it was: until then the run writes nothing in it but partial files. Claimed before
    // it is read, then checked again: another run may have written in it since the check above.
    let (_claim, mut made) = RunLock::make_and_claim("--out", out)?;
    check_adamerging_out(out, resume)?;
    let checkpoint = out.join(ADAMERGING_CHECKPOINT);
    let fresh = crate::output::is_empty_dir(out);
    let mut coefficients = run.initial(opts.init);
    let mut adam = Adam::new(opts.lr, (0.9, 0.999), 1e-8);
    let origins = tasks.iter().map(String::as_str).zip(data.iter().map(Dataset::origin));
    let print = fingerprint(&pretrained.path, experts, heads.path(), origins, opts);
    let (mut step, mut samplers) = if fresh {
        (0, TaskSampler::for_tasks(data.iter().map(Dataset::len), opts.batch_size, opts.seed))
    } else {
        check_resumable(&checkpoint, &print, opts.steps, with_later_defaults)?;
        let state = load_checkpoint(&checkpoint, &mut coefficients, &mut adam, experts.len())?;
        let lens: Vec<(&str, usize)> = tasks.iter().map(String::as_str).zip(data.iter().map(Dataset::len)).collect();
        check_restored(&checkpoint, &state.samplers, &lens, opts.batch_size)?;
        (state.step, state.samplers)
    };
    let mut model = run.model(be, &coefficients)?;
    while step < opts.steps {
        let batches: Vec<TaskBatch> = tasks
            .iter()
            .zip(data)
            .zip(samplers.iter_mut())
            .map(|((name, d), s)| {
                Ok(TaskBatch { head: heads.head(name)?, pixels: be.upload(d.gather(&s.next_batch())?)? })
            })
            .collect::<Result<_>>()?;
        let (loss, grads) = run.loss_and_gradient(be, &model, &coefficients, heads, &batches)?;
        finite(loss, &grads, step + 1, &checkpoint)?;
        adam.update(&mut coefficients.values, &grads, opts.lr)?;
        finite_after_update(&coefficients.values, step + 1, &checkpoint)?;
        model.vision = run.vision(be, &coefficients)?;
        step += 1;
        progress(AdaMergingStep { step, steps: opts.steps, loss });
        if step % opts.checkpoint_every == 0 || step == opts.steps {
            let state = CheckpointState {
                step,
                adam_step: adam.step,
                fingerprint: print.clone(),
                samplers: samplers.clone(),
                steps: Some(opts.steps),
                checkpoint_every: Some(opts.checkpoint_every),
                precision: Some(be.precision().to_string()),
            };
            save_checkpoint(&checkpoint, &state, &coefficients, &adam, experts.len())?;
            if let Some(made) = made.take() {
                made.keep();
            }
        }
    }
    drop(model);
    let (tensors, parameters) =
        write_output(&run, &coefficients, tasks, opts, out).with_context(|| model_not_written(out, "merged"))?;
    Ok(AdaMergingSummary { tensors, parameters, coefficients })
}

/// How the model was made, for its `config.json` under `"merge"`.
fn provenance(run: &AdaMerging, tasks: &[String], opts: &AdaMergingOptions) -> Value {
    json!({
        "tool": format!("wemoe-engine {}", env!("CARGO_PKG_VERSION")),
        "method": "adamerging",
        "experts": run.experts.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        "scaling": json_f32(opts.init),
        "steps": opts.steps,
        "lr": opts.lr,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
        "clamp_weights": opts.clamp,
        "granularity": opts.granularity.name(),
        "tasks": tasks,
    })
}

/// Writes the merged model (a plain CLIP vision model, with the pretrained projection and `logit_scale` when
/// it has them) and the coefficients into `dir`; returns the tensors and parameters written.
fn write_output(
    run: &AdaMerging,
    coefficients: &Coefficients,
    tasks: &[String],
    opts: &AdaMergingOptions,
    dir: &Path,
) -> Result<(usize, usize)> {
    let pretrained = run.pretrained;
    let mut config = pretrained.config.to_json();
    let obj = config.as_object_mut().expect("to_json gives an object");
    obj.insert("model_type".into(), "clip_vision_model".into());
    obj.insert("architectures".into(), json!(["CLIPVisionModel"]));
    obj.insert("merge".into(), provenance(run, tasks, opts));
    // Every vision tensor (a parameter merged, anything else as the pretrained model has it), then the extras.
    let mut names: Vec<String> =
        pretrained.store.names().filter(|n| n.starts_with("vision_model.")).map(str::to_string).collect();
    names.extend(
        ["visual_projection.weight", "logit_scale"]
            .iter()
            .filter(|n| pretrained.store.contains(n))
            .map(|n| n.to_string()),
    );
    let plan: Vec<(String, Vec<usize>)> =
        names.iter().map(|n| (n.clone(), pretrained.store.shape(n).unwrap_or_default().to_vec())).collect();
    let target = dir.join("model.safetensors");
    let partial = Partial::beside(&target);
    let mut writer = StreamingWriter::create(partial.path(), plan)?;
    let mut parameters = 0;
    for name in &names {
        let values = if run.names.contains(name) {
            run.merged(name, coefficients)?
        } else {
            let t = pretrained.store.get_any(name)?;
            t.host()?.to_vec()
        };
        writer.write(name, &values)?;
        parameters += values.len();
        pretrained.store.release(name);
    }
    writer.finish()?;
    // An error above returns early and drops the partial file, which removes it.
    partial.finish(&target).with_context(|| format!("{}: cannot write", dir.display()))?;
    // The config after the weights, as `adapt` writes them: a fresh run that cannot write the weights leaves no
    // config.json of a model without them.
    write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let preprocessor = pretrained.path.join("preprocessor_config.json");
    if preprocessor.exists() {
        std::fs::copy(&preprocessor, dir.join("preprocessor_config.json"))
            .with_context(|| format!("{}: cannot copy", preprocessor.display()))?;
    }
    let experts = run.experts.len();
    // FusionBench's `merge_weight`: [T, P] layer-wise, [T] task-wise.
    let shape = match run.granularity {
        Granularity::LayerWise => vec![experts, coefficients.names.len()],
        Granularity::TaskWise => vec![experts],
    };
    let matrix = NamedTensor { name: "merge_weight".into(), shape, values: coefficients.to_matrix(experts) };
    let metadata = BTreeMap::from([
        ("granularity".to_string(), run.granularity.name().to_string()),
        ("parameters".to_string(), serde_json::to_string(&run.names)?),
        ("experts".to_string(), serde_json::to_string(&run.experts.iter().map(|e| &e.name).collect::<Vec<_>>())?),
    ]);
    write_safetensors_with_metadata(&dir.join(COEFFICIENTS_FILE), &[matrix], metadata)?;
    Ok((names.len(), parameters))
}

/// A coefficients file written by [`adamerging`].
#[derive(Clone, Debug, PartialEq)]
pub struct CoefficientsFile {
    /// The experts, in order.
    pub experts: Vec<String>,
    /// The parameter tensors the coefficients scale, in [`parameter_order`].
    pub parameters: Vec<String>,
    /// Per expert and tensor, or per expert.
    pub granularity: Granularity,
    /// `merge_weight`: `[T, P]` layer-wise, `[T]` task-wise.
    pub values: Vec<f32>,
}

/// Reads a coefficients file written by [`adamerging`] (one without a granularity is layer-wise, as every
/// file was before task-wise AdaMerging).
pub fn read_coefficients(path: &Path) -> Result<CoefficientsFile> {
    let file = SafetensorsFile::open(path)?;
    let names = |key: &str| -> Result<Vec<String>> {
        let text = file.metadata(key).ok_or_else(|| anyhow!("{}: no '{key}' in its metadata", path.display()))?;
        serde_json::from_str(text)
            .with_context(|| format!("{}: its metadata's '{key}' is not a JSON list of names", path.display()))
    };
    let (parameters, experts) = (names("parameters")?, names("experts")?);
    let granularity = match file.metadata("granularity") {
        None | Some("layer-wise") => Granularity::LayerWise,
        Some("task-wise") => Granularity::TaskWise,
        Some(other) => bail!("{}: unknown granularity '{other}'", path.display()),
    };
    let merge_weight = file.f32("merge_weight")?;
    // FusionBench's `merge_weight`, as the merge writes it: [T, P] layer-wise, [T] task-wise.
    let shape = match granularity {
        Granularity::LayerWise => vec![experts.len(), parameters.len()],
        Granularity::TaskWise => vec![experts.len()],
    };
    ensure!(
        merge_weight.shape() == shape,
        "{}: merge_weight has shape {:?}, where its metadata's experts and parameters make {shape:?}",
        path.display(),
        merge_weight.shape()
    );
    let values = merge_weight.host()?.to_vec();
    Ok(CoefficientsFile { experts, parameters, granularity, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_from_before_the_options_resume_at_their_defaults() {
        let old = json!({"lr": 0.001, "seed": 0});
        let now = json!({"lr": 0.001, "seed": 0, "clamp_weights": false, "granularity": "layer-wise"});
        assert_eq!(with_later_defaults(old), now);
        let set = json!({"lr": 0.001, "clamp_weights": true, "granularity": "task-wise"});
        assert_eq!(with_later_defaults(set.clone()), set, "what a checkpoint says stays");
    }

    #[test]
    fn a_coefficients_file_is_read_by_its_shape_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COEFFICIENTS_FILE);
        let write = |shape: Vec<usize>, granularity: &str, experts: &str| {
            let metadata = BTreeMap::from([
                ("granularity".to_string(), granularity.to_string()),
                ("experts".to_string(), experts.to_string()),
                ("parameters".to_string(), r#"["p", "q", "r"]"#.to_string()),
            ]);
            let values = vec![0.3; shape.iter().product()];
            let tensor = NamedTensor { name: "merge_weight".into(), shape, values };
            crate::output::write_safetensors_with_metadata(&path, &[tensor], metadata).unwrap();
            read_coefficients(&path).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(write(vec![2, 3], "layer-wise", r#"["a", "b"]"#).unwrap().values.len(), 6);
        assert_eq!(write(vec![2], "task-wise", r#"["a", "b"]"#).unwrap().values.len(), 2);
        // The same count of values in another shape (a transposed matrix, once read as it came) is refused.
        let err = write(vec![3, 2], "layer-wise", r#"["a", "b"]"#).unwrap_err();
        let want = "merge_weight has shape [3, 2], where its metadata's experts and parameters make [2, 3]";
        assert!(err.ends_with(want), "{err}");
        let err = write(vec![2, 3], "layer-wise", r#"{"a": 1}"#).unwrap_err();
        assert!(err.contains("its metadata's 'experts' is not a JSON list of names"), "{err}");
    }

    #[test]
    fn parameter_order_is_named_parameters_order() {
        let config = VisionConfig { num_hidden_layers: 2, ..VisionConfig::default() };
        let names = parameter_order(&config);
        assert_eq!(names.len(), 5 + 16 * 2 + 2);
        assert_eq!(names[0], "vision_model.embeddings.class_embedding");
        assert_eq!(names[5], "vision_model.encoder.layers.0.self_attn.k_proj.weight");
        assert_eq!(names[14], "vision_model.encoder.layers.0.layer_norm1.bias");
        assert_eq!(names[20], "vision_model.encoder.layers.0.layer_norm2.bias");
        assert_eq!(names.last().unwrap(), "vision_model.post_layernorm.bias");
    }
}
