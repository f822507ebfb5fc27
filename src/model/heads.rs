//! Zero-shot classification heads: per-task class embeddings and the logits they give.
//!
//! A heads file is safetensors with `head.<TASK>` `[C, P]` (L2-normalised rows), and optionally
//! `logit_scale` (HF's raw value) and `visual_projection.weight` `[P, D]`, which win over the model's; its
//! header metadata may name each head's classes (`classes`: a JSON object of task → names in row order, as
//! tools/make_heads.py writes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::ImageEncoder;
use crate::checkpoint::TensorStore;
use crate::device::{Backend, LinearWeight};
use crate::tensor::Tensor;

/// The classification heads of a set of tasks.
pub struct Heads {
    path: PathBuf,
    tasks: BTreeMap<String, LinearWeight>,
    logit_scale: Option<f32>,
    projection: Option<LinearWeight>,
    class_names: BTreeMap<String, Vec<String>>,
}

/// What turns a pooled output into one task's logits.
pub struct Classifier<'a> {
    projection: &'a LinearWeight,
    scale: f32,
}

impl Heads {
    /// Reads and validates a heads file.
    pub fn open(be: &dyn Backend, path: &Path) -> Result<Self> {
        let store = open_store(path)?;
        let mut tasks = BTreeMap::new();
        for name in store.names() {
            if let Some(task) = name.strip_prefix("head.") {
                let shape = store.shape(name).unwrap_or_default();
                ensure!(
                    shape.len() == 2 && shape[0] > 0 && shape[1] > 0,
                    "{}: tensor '{name}' has shape {shape:?}, expected [classes, projection]",
                    path.display()
                );
                tasks.insert(task.to_string(), be.prepare_linear(store.get(name, shape)?)?);
            }
        }
        ensure!(!tasks.is_empty(), "{}: no head.<TASK> tensors", path.display());
        let logit_scale =
            if store.contains("logit_scale") { Some(store.get("logit_scale", &[1])?.host()?[0]) } else { None };
        let projection = if store.contains("visual_projection.weight") {
            let tensor = store.get_any("visual_projection.weight")?;
            ensure!(tensor.shape().len() == 2, "{}: visual_projection.weight must be [P, D]", path.display());
            Some(be.prepare_linear(tensor)?)
        } else {
            None
        };
        let class_names = read_class_names(path, store.files()[0].metadata("classes"), &tasks)?;
        Ok(Heads { path: path.to_path_buf(), tasks, logit_scale, projection, class_names })
    }

    /// Checks from the file's header alone that `path` is a heads file with a head for each of `tasks`: what a
    /// command verifies before it opens a device, so that a refusal comes first and alone.
    pub fn check_tasks<'a>(path: &Path, tasks: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let store = open_store(path)?;
        let known: Vec<&str> = store.names().filter_map(|n| n.strip_prefix("head.")).collect();
        ensure!(!known.is_empty(), "{}: no head.<TASK> tensors", path.display());
        match tasks.into_iter().find(|task| !known.contains(task)) {
            Some(task) => Err(no_head(path, task, known)),
            None => Ok(()),
        }
    }

    /// The file's own `visual_projection.weight`, when it has one.
    pub fn own_projection(&self) -> Option<&LinearWeight> {
        self.projection.as_ref()
    }

    /// The file's own raw `logit_scale`, when it has one.
    pub fn own_logit_scale(&self) -> Option<f32> {
        self.logit_scale
    }

    /// The class names of `task`'s rows, when the file names them.
    pub fn class_names(&self, task: &str) -> Option<&[String]> {
        self.class_names.get(task).map(Vec::as_slice)
    }

    /// The heads file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The task names, sorted.
    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// The class embeddings `[C, P]` of `task`; an error lists the tasks the file has.
    pub fn head(&self, task: &str) -> Result<&LinearWeight> {
        self.tasks.get(task).ok_or_else(|| no_head(&self.path, task, self.task_names().collect()))
    }

    /// The projection and logit scale to use with `encoder` (`model` names it in errors): each from the
    /// heads file if it has it, else from the model; the scale defaults to ln 100.
    pub fn classifier<'a>(&'a self, encoder: &'a ImageEncoder, model: &Path) -> Result<Classifier<'a>> {
        let projection = self.projection.as_ref().or(encoder.projection.as_ref()).with_context(|| {
            format!(
                "{}: has no visual_projection.weight, and neither has the model {}",
                self.path.display(),
                model.display()
            )
        })?;
        let d = encoder.vision.config.hidden_size;
        ensure!(
            projection.in_features() == d,
            "{}: visual_projection.weight is [{}, {}], which does not fit the model's width {d}",
            self.path.display(),
            projection.out_features(),
            projection.in_features()
        );
        for (task, head) in &self.tasks {
            ensure!(
                head.in_features() == projection.out_features(),
                "{}: head.{task} is [{}, {}], which does not match the projection width {}",
                self.path.display(),
                head.out_features(),
                head.in_features(),
                projection.out_features()
            );
        }
        let raw = self.logit_scale.or(encoder.logit_scale).unwrap_or(100f32.ln());
        // Past ln(f32::MAX) every logit would be infinite, and the argmax and the entropy meaningless.
        ensure!(
            raw.exp().is_finite(),
            "{}: logit_scale {raw}: its exp overflows f32, so every logit would be infinite (CLIP's is ln 100 \
             = 4.6052)",
            if self.logit_scale.is_some() { &self.path } else { model }.display()
        );
        Ok(Classifier { projection, scale: raw.exp() })
    }
}

/// The `classes` metadata of heads file `path`: each named task's list as long as its head has rows, unique.
fn read_class_names(
    path: &Path,
    metadata: Option<&str>,
    tasks: &BTreeMap<String, LinearWeight>,
) -> Result<BTreeMap<String, Vec<String>>> {
    let Some(text) = metadata else { return Ok(BTreeMap::new()) };
    let names: BTreeMap<String, Vec<String>> = serde_json::from_str(text).with_context(|| {
        format!("{}: its metadata's `classes` is not a JSON object of task → list of class names", path.display())
    })?;
    for (task, list) in &names {
        if let Some(head) = tasks.get(task) {
            ensure!(
                list.len() == head.out_features(),
                "{}: its metadata names {} for task '{task}', whose head has {} rows",
                path.display(),
                if list.len() == 1 { "1 class".to_string() } else { format!("{} classes", list.len()) },
                head.out_features()
            );
        }
        let unique: std::collections::BTreeSet<&String> = list.iter().collect();
        ensure!(unique.len() == list.len(), "{}: its metadata names a class twice for task '{task}'", path.display());
    }
    Ok(names)
}

/// The heads file at `path`, opened (its header read, its data mapped).
fn open_store(path: &Path) -> Result<TensorStore> {
    if !path.exists() {
        bail!("{}: no such heads file", path.display());
    }
    TensorStore::open_file(path)
}

/// The error for a task the heads file at `path` has no head for; it lists the tasks it has, sorted.
fn no_head(path: &Path, task: &str, mut known: Vec<&str>) -> anyhow::Error {
    known.sort_unstable();
    anyhow::anyhow!("{}: no head for task '{task}' (it has: {})", path.display(), known.join(", "))
}

impl<'a> Classifier<'a> {
    /// The projection in use.
    pub fn projection(&self) -> &'a LinearWeight {
        self.projection
    }

    /// `exp(logit_scale)`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `exp(logit_scale) · normalize(pooled · projectionᵀ) · headᵀ`, `[B, C]`.
    pub fn logits(&self, be: &dyn Backend, pooled: &Tensor, head: &LinearWeight) -> Result<Tensor> {
        let embeds = be.linear(pooled, self.projection, None)?;
        let normed = be.l2_normalize(&embeds)?;
        let logits = be.linear(&normed, head, None)?;
        be.scale(&logits, self.scale)
    }
}
