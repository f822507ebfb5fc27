//! The adaptation loop: per step, one batch of every task, the summed entropy's router gradients, one Adam
//! step; checkpoints every few steps; the adapted model written at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{check_restored, Adam, RouterParams, TaskSampler};
use crate::autograd::{entropy_loss_and_router_gradients, TaskBatch};
use crate::checkpoint::{ModelDir, SafetensorsFile, StreamingWriter};
use crate::data::Dataset;
use crate::device::Backend;
use crate::model::{Heads, ImageEncoder, Routing};
use crate::output::{write_atomic, write_safetensors_with_metadata, NamedTensor};
use crate::partial::Partial;
use crate::run_lock::RunLock;
use crate::tensor::Tensor;

/// The learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// The same rate every step (FusionBench).
    Constant,
    /// Cosine annealing from the rate to zero over the run (the paper's code).
    Cosine,
}

/// What `adapt` is asked to do.
#[derive(Clone, Debug)]
pub struct AdaptOptions {
    /// Steps in all.
    pub steps: u64,
    /// Adam's learning rate.
    pub lr: f64,
    /// Images per task per step.
    pub batch_size: usize,
    /// Routing during adaptation.
    pub routing: Routing,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Seed of the task streams.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
}

impl AdaptOptions {
    /// Refuses settings no run can take (a command checks them before it opens anything).
    pub fn check(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be positive");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a positive number, got {}", self.lr);
        ensure!(self.batch_size > 0, "--batch-size must be positive");
        ensure!(self.checkpoint_every > 0, "--checkpoint-every must be positive");
        Ok(())
    }
}

/// One step's report, for progress.
pub struct StepReport<'a> {
    /// Steps done (1-based).
    pub step: u64,
    /// Steps in all.
    pub steps: u64,
    /// The step's loss (sum over tasks of the batch-mean entropy).
    pub loss: f64,
    /// The routers after the step (for curves of accuracy against steps).
    pub routers: &'a RouterParams,
}

/// The checkpoint file inside `--out`.
pub const CHECKPOINT: &str = "adapt-checkpoint.safetensors";

/// The arguments a resumed run must share with the checkpoint's.
fn fingerprint(model: &Path, heads: &Path, tasks: &[(String, PathBuf)], o: &AdaptOptions) -> Value {
    let tasks: Vec<Value> = tasks.iter().map(|(n, p)| json!([n, recorded_path(p)])).collect();
    let mut f = json!({
        "model": recorded_path(model), "heads": recorded_path(heads), "tasks": tasks,
        "lr": o.lr, "batch_size": o.batch_size, "routing": format!("{:?}", o.routing),
        "schedule": format!("{:?}", o.schedule), "seed": o.seed,
    });
    // The cosine schedule depends on the run's length; a constant one may be extended by resuming.
    if o.schedule == Schedule::Cosine {
        f["steps"] = json!(o.steps);
    }
    f
}

/// An error unless a step's loss and gradients are finite, saying whether `checkpoint` keeps the last good state.
pub(crate) fn finite(loss: f64, grads: &BTreeMap<String, Vec<f32>>, step: u64, checkpoint: &Path) -> Result<()> {
    if loss.is_finite() && grads.values().flatten().all(|g| g.is_finite()) {
        return Ok(());
    }
    // At the first step nothing is trained yet: the model as given overflows on these images.
    let why = if step == 1 {
        ": the model as given overflows f32 on these images (merged with too large a --scaling?)"
    } else {
        ""
    };
    bail!("the loss turned non-finite at step {step} ({loss}){why}; {}", kept(checkpoint))
}

/// An error unless the trained values are finite after step `step`'s update (a rate so large that Adam's step
/// overflows), before a checkpoint could keep them.
pub(crate) fn finite_after_update(values: &BTreeMap<String, Vec<f32>>, step: u64, checkpoint: &Path) -> Result<()> {
    if values.values().flatten().all(|v| v.is_finite()) {
        return Ok(());
    }
    bail!("the trained values turned non-finite in step {step}'s update (is --lr too large?); {}", kept(checkpoint))
}

/// Whether a run stopped by a non-finite value keeps a checkpoint, as its error says.
fn kept(checkpoint: &Path) -> String {
    if checkpoint.exists() {
        format!("the last good checkpoint is kept in {}", checkpoint.display())
    } else {
        "no checkpoint was written yet".into()
    }
}

/// A path argument as a checkpoint records it: canonical where it resolves, so that `w`, `./w/` and `/data/w`
/// (from any folder) are the same input to `--resume`.
pub(crate) fn recorded_path(path: &Path) -> String {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// The fingerprint keys that hold a path, and those that hold `[name, path]` pairs (adapt's and AdaMerging's).
const PATH_KEYS: [&str; 3] = ["model", "heads", "pretrained"];
const PAIR_KEYS: [&str; 2] = ["tasks", "experts"];

/// `fingerprint` with each path resolved from the current folder: a checkpoint made before paths were recorded
/// canonically holds them as given, relative to where its run started.
fn with_paths_resolved(mut fingerprint: Value) -> Value {
    let resolve = |v: &mut Value| {
        if let Some(path) = v.as_str() {
            *v = Value::String(recorded_path(Path::new(path)));
        }
    };
    for key in PATH_KEYS {
        if let Some(path) = fingerprint.get_mut(key) {
            resolve(path);
        }
    }
    for key in PAIR_KEYS {
        if let Some(Value::Array(pairs)) = fingerprint.get_mut(key) {
            pairs.iter_mut().filter_map(|pair| pair.get_mut(1)).for_each(resolve);
        }
    }
    fingerprint
}

/// An error naming the first argument that differs, unless a checkpoint's arguments `saved` are `now`'s (paths
/// compared where they lead, not as spelled).
fn same_arguments(checkpoint: &Path, saved: &Value, now: &Value) -> Result<()> {
    let (saved, now) = (&with_paths_resolved(saved.clone()), &with_paths_resolved(now.clone()));
    if saved == now {
        return Ok(());
    }
    // The first that differs: one this run gives otherwise, else one only the checkpoint names.
    let keys = now.as_object().into_iter().chain(saved.as_object()).flat_map(|o| o.keys());
    let key = keys.into_iter().find(|k| saved.get(k.as_str()) != now.get(k.as_str())).cloned().unwrap_or_default();
    let shown = |v: &Value| v.get(&key).cloned().unwrap_or(Value::Null);
    bail!(
        "--resume: {} was made with other arguments ({key}: {} there, {} now); resume with the same ones",
        checkpoint.display(),
        shown(saved),
        shown(now)
    )
}

/// An error when a checkpoint is past the run's last step: its state is not the one after `steps` steps, and
/// the model written from it would say otherwise.
fn not_past_the_end(checkpoint: &Path, step: u64, steps: u64) -> Result<()> {
    ensure!(
        step <= steps,
        "--resume: {} is at step {step}, past --steps {steps}; resume with --steps {step} or more, or choose another \
         --out",
        checkpoint.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_names_the_argument_that_differs_on_either_side() {
        let at = Path::new("ckpt");
        let now = serde_json::json!({"lr": 0.001, "seed": 0});
        assert!(same_arguments(at, &now, &now).is_ok());
        let other = serde_json::json!({"lr": 0.002, "seed": 0});
        let e = same_arguments(at, &other, &now).unwrap_err().to_string();
        assert!(e.contains("(lr: 0.002 there, 0.001 now)"), "{e}");
        // An argument the checkpoint has and this run does not.
        let more = serde_json::json!({"lr": 0.001, "seed": 0, "granularity": "task-wise"});
        let e = same_arguments(at, &more, &now).unwrap_err().to_string();
        assert!(e.contains("(granularity: \"task-wise\" there, null now)"), "{e}");
    }

    #[test]
    fn a_resume_compares_paths_where_they_lead() {
        // AdaMerging's keys: the pretrained model's path and the experts' [name, path] pairs.
        let tmp = tempfile::tempdir().unwrap();
        for folder in ["p", "e", "x"] {
            std::fs::create_dir(tmp.path().join(folder)).unwrap();
        }
        let at = |rest: &str| format!("{}/{rest}", tmp.path().display());
        let saved = serde_json::json!({"pretrained": at("p"), "experts": [["a", at("e")]], "lr": 0.001});
        let spelled = serde_json::json!({"pretrained": at("./p/"), "experts": [["a", at("x/../e")]], "lr": 0.001});
        assert!(same_arguments(Path::new("ckpt"), &saved, &spelled).is_ok());
        let other = serde_json::json!({"pretrained": at("p"), "experts": [["a", at("x")]], "lr": 0.001});
        let e = same_arguments(Path::new("ckpt"), &saved, &other).unwrap_err().to_string();
        assert!(e.contains("(experts: "), "{e}");
    }
}

/// What a checkpoint holds besides the trained tensors and Adam's moments (also AdaMerging's).
#[derive(Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    /// Steps done.
    pub step: u64,
    /// Adam's step count.
    pub adam_step: u64,
    /// The arguments a resumed run must share.
    pub fingerprint: Value,
    /// The task streams, as they were after the step's draw.
    pub samplers: Vec<TaskSampler>,
    /// The run's `--steps` when it saved (absent from checkpoints made before 2026-12-02).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// The run's `--checkpoint-every` (absent as `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// The run's `--precision` (absent as `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
}

fn save_checkpoint(out: &Path, state: &CheckpointState, params: &RouterParams, adam: &Adam) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, values) in &params.values {
        let shape = params.shapes[name].clone();
        let (m, v) =
            adam.moments.get(name).cloned().unwrap_or_else(|| (vec![0.0; values.len()], vec![0.0; values.len()]));
        tensors.push(NamedTensor { name: format!("router.{name}"), shape: shape.clone(), values: values.clone() });
        tensors.push(NamedTensor { name: format!("adam.m.{name}"), shape: shape.clone(), values: m });
        tensors.push(NamedTensor { name: format!("adam.v.{name}"), shape, values: v });
    }
    let meta = BTreeMap::from([("state".to_string(), serde_json::to_string(state)?)]);
    write_safetensors_with_metadata(&out.join(CHECKPOINT), &tensors, meta)
}

impl CheckpointState {
    /// The state a checkpoint file's metadata holds.
    pub(crate) fn of(file: &SafetensorsFile, path: &Path) -> Result<Self> {
        serde_json::from_str(file.metadata("state").with_context(|| format!("{}: no state", path.display()))?)
            .with_context(|| format!("{}: unreadable state", path.display()))
    }
}

/// The checkpoint file of an `adapt` or AdaMerging run in the folder `dir`, if it holds one.
pub fn run_checkpoint(dir: &Path) -> Option<PathBuf> {
    [CHECKPOINT, crate::merge::ADAMERGING_CHECKPOINT].into_iter().map(|name| dir.join(name)).find(|f| f.is_file())
}

/// What a checkpoint, `adapt`'s or AdaMerging's, says of its run: from its metadata alone, for `info`.
#[derive(Debug)]
pub struct CheckpointSummary {
    /// Steps done.
    pub step: u64,
    /// The run's `--steps` when it saved, where the checkpoint records it.
    pub steps: Option<u64>,
    /// The run's `--checkpoint-every`, where the checkpoint records it.
    pub checkpoint_every: Option<u64>,
    /// The run's `--precision` (`f32`, `tf32`, `bf16`), where the checkpoint records it.
    pub precision: Option<String>,
    /// The arguments a resumed run must share, by name: paths absolute, `tasks` (and AdaMerging's `experts`) as
    /// `[name, path]` pairs.
    pub arguments: Value,
}

impl CheckpointSummary {
    /// Reads the checkpoint file `path`; an error names it where it is no checkpoint or is damaged.
    pub fn read(path: &Path) -> Result<Self> {
        let state = CheckpointState::of(&SafetensorsFile::open(path)?, path)?;
        let steps = state.steps.or_else(|| state.fingerprint.get("steps").and_then(Value::as_u64));
        let (checkpoint_every, precision) = (state.checkpoint_every, state.precision);
        Ok(CheckpointSummary { step: state.step, steps, checkpoint_every, precision, arguments: state.fingerprint })
    }

    /// Whether the run was AdaMerging's (its arguments name the pretrained model), else `adapt`'s.
    pub fn is_adamerging(&self) -> bool {
        self.arguments.get("pretrained").is_some()
    }
}

fn load_checkpoint(path: &Path, params: &mut RouterParams, adam: &mut Adam) -> Result<CheckpointState> {
    let file = SafetensorsFile::open(path)?;
    let state = CheckpointState::of(&file, path)?;
    for (name, values) in params.values.iter_mut() {
        // Each of the three as long as the model's router tensor: another model's checkpoint does not fit.
        let len = values.len();
        let read = |key: String| -> Result<Vec<f32>> {
            let read = file.f32(&key)?.host()?.to_vec();
            ensure!(
                read.len() == len,
                "{}: '{key}' holds {} values, the model's router {len}",
                path.display(),
                read.len()
            );
            Ok(read)
        };
        *values = read(format!("router.{name}"))?;
        adam.moments.insert(name.clone(), (read(format!("adam.m.{name}"))?, read(format!("adam.v.{name}"))?));
    }
    adam.step = state.adam_step;
    Ok(state)
}

/// How the routers were adapted, for the adapted model's `config.json`: the tool, the settings and the task
/// names (not their paths, which belong to one machine).
fn adaptation_record(tasks: &[(String, PathBuf)], o: &AdaptOptions) -> Value {
    json!({
        "tool": format!("wemoe-engine {}", env!("CARGO_PKG_VERSION")),
        "steps": o.steps,
        "lr": o.lr,
        "batch_size": o.batch_size,
        "routing": match o.routing { Routing::Sample => "sample", Routing::Batch => "batch" },
        "schedule": match o.schedule { Schedule::Constant => "constant", Schedule::Cosine => "cosine" },
        "seed": o.seed,
        "tasks": tasks.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
    })
}

/// Writes the adapted model: every tensor of the input checkpoint, the routers replaced; its `config.json`
/// adds `record` to the list of adaptations under `"adaptation"`.
fn write_model(dir: &ModelDir, params: &RouterParams, out: &Path, record: Value) -> Result<()> {
    let names: Vec<String> = dir.store.names().map(str::to_string).collect();
    let plan = names.iter().map(|n| (n.clone(), dir.store.shape(n).unwrap_or_default().to_vec())).collect();
    let target = out.join("model.safetensors");
    let partial = Partial::beside(&target);
    let mut writer = StreamingWriter::create(partial.path(), plan)?;
    for name in &names {
        match params.values.get(name) {
            Some(values) => writer.write(name, values)?,
            None => writer.write(name, dir.store.get_any(name)?.host()?)?,
        }
    }
    writer.finish()?;
    partial.finish(&target).with_context(|| format!("{}: cannot write", out.display()))?;
    let mut config = dir.json.clone();
    if let Some(obj) = config.as_object_mut() {
        if let Some(spec) = dir.wemoe.as_ref() {
            obj.insert("wemoe".into(), spec.to_json());
        }
        // A model adapted again keeps the record of each run, oldest first.
        let mut runs = obj.get("adaptation").and_then(Value::as_array).cloned().unwrap_or_default();
        runs.push(record);
        obj.insert("adaptation".into(), Value::Array(runs));
    }
    write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let preprocessor = dir.path.join("preprocessor_config.json");
    if preprocessor.exists() {
        write_atomic(&out.join("preprocessor_config.json"), &std::fs::read(&preprocessor)?)?;
    }
    Ok(())
}

/// `--out` receives the checkpoints and then the adapted model: it may be new (in an existing folder), empty, or
/// an adapt run's (one holding its checkpoint), but not the model's own directory nor another model's, which it
/// would replace, nor an AdaMerging run's.
/// [`adapt`] checks it; the command line checks it first too, before the device opens.
pub fn check_out(out: &Path, model: &Path) -> Result<()> {
    if !out.exists() {
        return crate::output::check_folder_target("--out", out);
    }
    ensure!(out.is_dir(), "--out {}: is a file; adapt writes a model directory there", out.display());
    let same = matches!((out.canonicalize(), model.canonicalize()), (Ok(o), Ok(m)) if o == m);
    ensure!(
        !same,
        "--out {}: is the --model's directory, whose model the adapted one would replace; choose another --out",
        out.display()
    );
    // AdaMerging's run folder: its checkpoint and model would sit beside this run's, and `info` show one of them.
    ensure!(
        !out.join(crate::merge::ADAMERGING_CHECKPOINT).exists(),
        "--out {}: holds an AdaMerging run's checkpoint; choose a new --out directory",
        out.display()
    );
    let holds_model = ["config.json", "model.safetensors"].iter().any(|f| out.join(f).exists());
    ensure!(
        !holds_model || out.join(CHECKPOINT).exists(),
        "--out {}: holds a model and no adapt checkpoint; choose a new --out directory",
        out.display()
    );
    Ok(())
}

/// Refuses a run that the checkpoint in `out` could not serve: any run without `resume`, or one with other
/// arguments than the checkpoint was made with, or fewer `--steps` than it has done. It reads the checkpoint's
/// metadata only, so that the command line can refuse before the device opens.
pub fn check_checkpoint(
    out: &Path,
    resume: bool,
    model: &Path,
    heads: &Path,
    tasks: &[(String, PathBuf)],
    opts: &AdaptOptions,
) -> Result<()> {
    let checkpoint = out.join(CHECKPOINT);
    if !checkpoint.exists() {
        return Ok(());
    }
    ensure!(resume, "{}: holds a checkpoint; pass --resume to continue it, or choose another --out", out.display());
    check_resumable(&checkpoint, &fingerprint(model, heads, tasks, opts), opts.steps, |saved| saved)
}

/// Refuses to continue `checkpoint` (adapt's or AdaMerging's) with other arguments than it was made with
/// (`print` is this run's fingerprint; `saved` brings the checkpoint's to its current form), or with fewer
/// `steps` than it has done. It reads the file's metadata only.
pub(crate) fn check_resumable(
    checkpoint: &Path,
    print: &Value,
    steps: u64,
    saved: impl FnOnce(Value) -> Value,
) -> Result<()> {
    // A checkpoint cut short or damaged (a disk that filled under another program, a copy interrupted): the run
    // cannot continue it, and should say how to start again.
    let state =
        SafetensorsFile::open(checkpoint).and_then(|file| CheckpointState::of(&file, checkpoint)).map_err(|e| {
            let out = checkpoint.parent().unwrap_or(Path::new(".")).display();
            anyhow!("{e:#}; --resume cannot continue it: start again with another --out, or remove {out} first")
        })?;
    same_arguments(checkpoint, &saved(state.fingerprint), print)?;
    not_past_the_end(checkpoint, state.step, steps)
}

/// Adapts the routers of the WEMoE model in `dir` on `tasks` (names and unlabeled data), writing
/// checkpoints and the adapted model into `out`. With `resume`, continues from `out`'s checkpoint. An `out`
/// this call makes is removed again if it fails before its first checkpoint. The run holds `out` while it lives
/// ([`RunLock`]): a second run given the same folder meanwhile is refused.
/// Each step draws shuffled images: a parquet dataset should be held in memory first
/// ([`Dataset::hold_in_memory`]), as the command line does, or each image reopens its file.
#[allow(clippy::too_many_arguments)]
pub fn adapt(
    be: &dyn Backend,
    dir: &ModelDir,
    heads: &Heads,
    tasks: &[(String, PathBuf)],
    data: &[Dataset],
    opts: &AdaptOptions,
    out: &Path,
    resume: bool,
    progress: &mut dyn FnMut(StepReport),
) -> Result<()> {
    opts.check()?;
    ensure!(
        dir.wemoe.is_some(),
        "{}: not a WEMoE model; merge one with `wemoe-engine merge` first",
        dir.path.display()
    );
    for (name, _) in tasks {
        heads.head(name)?;
    }
    check_out(out, &dir.path)?;
    // A folder this run makes goes again if it fails or is interrupted before its first checkpoint; one made
    // ahead stays, as it was. Claimed before its checkpoint is read, so that no other run changes it from then on.
    let (_claim, mut made) = RunLock::make_and_claim("--out", out)?;
    check_checkpoint(out, resume, &dir.path, heads.path(), tasks, opts)?;
    let mut model = ImageEncoder::load(be, dir)?;
    let mut params = RouterParams::load(&model, &dir.store)?;
    let mut adam = Adam::new(opts.lr, (0.9, 0.999), 1e-8);
    let print = fingerprint(&dir.path, heads.path(), tasks, opts);
    let checkpoint = out.join(CHECKPOINT);
    // `check_checkpoint` passed: a checkpoint here is this run's to continue.
    let (mut step, mut samplers) = if checkpoint.exists() {
        let state = load_checkpoint(&checkpoint, &mut params, &mut adam)?;
        let lens: Vec<(&str, usize)> =
            tasks.iter().map(|(n, _)| n.as_str()).zip(data.iter().map(Dataset::len)).collect();
        check_restored(&checkpoint, &state.samplers, &lens, opts.batch_size)?;
        params.apply(be, &mut model)?;
        (state.step, state.samplers)
    } else {
        (0, TaskSampler::for_tasks(data.iter().map(Dataset::len), opts.batch_size, opts.seed))
    };
    // Each step's images load on another thread while the step before computes: the same images in the same
    // order as loading them in turn, so results do not change; only the wait goes (a GPU step no longer idles
    // while JPEGs decode). A checkpoint saves the samplers as they were after its own step's draw.
    std::thread::scope(|scope| -> Result<()> {
        let load = |indices: Vec<Vec<usize>>| {
            scope.spawn(move || -> Result<Vec<Tensor>> {
                data.iter().zip(&indices).map(|(d, batch)| d.gather(batch)).collect()
            })
        };
        let mut next = (step < opts.steps).then(|| {
            let indices = samplers.iter_mut().map(TaskSampler::next_batch).collect();
            (load(indices), samplers.clone())
        });
        while let Some((loading, drawn)) = next.take() {
            let pixels = loading.join().map_err(|_| anyhow!("the image loader panicked"))??;
            if step + 1 < opts.steps {
                let indices = samplers.iter_mut().map(TaskSampler::next_batch).collect();
                next = Some((load(indices), samplers.clone()));
            }
            let lr = match opts.schedule {
                Schedule::Constant => opts.lr,
                Schedule::Cosine => {
                    opts.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / opts.steps as f64).cos())
                }
            };
            let batches: Vec<TaskBatch> = tasks
                .iter()
                .zip(pixels)
                .map(|((name, _), pixels)| Ok(TaskBatch { head: heads.head(name)?, pixels: be.upload(pixels)? }))
                .collect::<Result<_>>()?;
            let (loss, grads) = {
                let classifier = heads.classifier(&model, &dir.path)?;
                entropy_loss_and_router_gradients(be, &model, &classifier, &batches, opts.routing)?
            };
            let grads: BTreeMap<String, Vec<f32>> =
                grads.into_iter().map(|(n, g)| Ok((n, be.to_host(&g)?))).collect::<Result<_>>()?;
            finite(loss, &grads, step + 1, &checkpoint)?;
            adam.update(&mut params.values, &grads, lr)?;
            finite_after_update(&params.values, step + 1, &checkpoint)?;
            params.apply(be, &mut model)?;
            step += 1;
            progress(StepReport { step, steps: opts.steps, loss, routers: &params });
            if step % opts.checkpoint_every == 0 || step == opts.steps {
                let state = CheckpointState {
                    step,
                    adam_step: adam.step,
                    fingerprint: print.clone(),
                    samplers: drawn,
                    steps: Some(opts.steps),
                    checkpoint_every: Some(opts.checkpoint_every),
                    precision: Some(be.precision().to_string()),
                };
                save_checkpoint(out, &state, &params, &adam)?;
                if let Some(made) = made.take() {
                    made.keep();
                }
            }
        }
        Ok(())
    })?;
    write_model(dir, &params, out, adaptation_record(tasks, opts)).with_context(|| model_not_written(out, "adapted"))
}

/// Why a run's last write failing loses no training (`adapt`'s and AdaMerging's): the checkpoint in `out` holds
/// every step by then, and `--resume` writes the `what` model from it.
pub(crate) fn model_not_written(out: &Path, what: &str) -> String {
    format!(
        "{}: the {what} model was not written; its checkpoint holds every step, and --resume writes the model from it",
        out.display()
    )
}
