//! `wemoe-engine heads`: zero-shot classification heads from a CLIP model's text tower, as FusionBench
//! computes them, into the heads file `eval` and `adapt` take (what `tools/make_heads.py` writes, without
//! Python).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use wemoe_engine::checkpoint::{ModelDir, ModelKind};
use wemoe_engine::data::dataset_class_names;
use wemoe_engine::device::{self, DeviceRequest, Precision};
use wemoe_engine::output::{check_file_target, check_not_an_input, write_safetensors_with_metadata, NamedTensor};
use wemoe_engine::text::{class_embeddings, ClipText, ClipTokenizer, TaskPrompts, TextConfig, DEFAULT_TEMPLATE};

use super::{count, progress};

/// One task's classes and templates, and where they came from.
pub struct TaskClasses {
    pub name: String,
    pub source: PathBuf,
    pub classes: Vec<String>,
    /// The source's own templates (a JSON object's `templates`), if it has them.
    pub templates: Option<Vec<String>>,
}

pub struct Args {
    pub clip: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub tasks: Vec<TaskClasses>,
    pub templates: Vec<String>,
    pub out: PathBuf,
}

/// Reads `--task NAME[=SOURCE]`'s class names (SOURCE already found in the Hugging Face cache where it is a
/// Hub dataset name): a JSON list of names or `{"classes": [...], "templates": [...]}`, a text file of one
/// name per line, an ImageFolder, or a parquet dataset's `ClassLabel` names.
pub fn read_task(name: &str, source: &Path, given: &str) -> Result<TaskClasses> {
    let at = || format!("--task {given}");
    let extension = source.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let (classes, templates) = match (source.is_file(), extension) {
        (true, "json") => read_json(source).with_context(at)?,
        (true, "safetensors") => bail!(
            "--task {given}: {} is a safetensors dataset, which names no classes; list them in a text file, one per \
             line",
            source.display()
        ),
        (true, ext) if ext != "parquet" => {
            // An image file is refused as naming no classes, not as text that is not UTF-8.
            dataset_class_names(source).with_context(at)?;
            let text = std::fs::read_to_string(source)
                .with_context(|| format!("{}: cannot read as text", source.display()))?;
            (text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect(), None)
        }
        _ => match dataset_class_names(source).with_context(at)? {
            Some(classes) => (classes, None),
            None => bail!(
                "--task {given}: {} is no file, folder or parquet dataset, nor a dataset in the Hugging Face cache; \
                 for a FusionBench task's class names and templates, write them with `tools/fusionbench_classes.py \
                 {name} > {name}.json` and give --task {name}={name}.json",
                source.display()
            ),
        },
    };
    ensure!(!classes.is_empty(), "--task {given}: {} holds no class names", source.display());
    let mut seen = BTreeSet::new();
    if let Some(twice) = classes.iter().find(|c| !seen.insert(c.as_str())) {
        bail!("--task {given}: the class name {twice:?} appears twice in {}", source.display());
    }
    Ok(TaskClasses { name: name.to_string(), source: source.to_path_buf(), classes, templates })
}

/// A JSON list of class names, or an object with `classes` and, optionally, `templates`.
fn read_json(path: &Path) -> Result<(Vec<String>, Option<Vec<String>>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let strings = |v: &Value, what: &str| -> Result<Vec<String>> {
        let list = v.as_array().filter(|a| a.iter().all(Value::is_string));
        let list = list.with_context(|| format!("{}: {what} must be a list of strings", path.display()))?;
        Ok(list.iter().filter_map(|s| s.as_str().map(String::from)).collect())
    };
    match &value {
        Value::Array(_) => Ok((strings(&value, "the file")?, None)),
        Value::Object(o) => {
            let classes = o.get("classes").with_context(|| format!("{}: no \"classes\" list", path.display()))?;
            let templates = o.get("templates").map(|t| strings(t, "\"templates\"")).transpose()?;
            Ok((strings(classes, "\"classes\"")?, templates))
        }
        _ => bail!("{}: expected a list of class names or an object with \"classes\"", path.display()),
    }
}

pub fn run(args: &Args, device: DeviceRequest, precision: Precision, quiet: bool) -> Result<()> {
    ensure!(
        !matches!(device, DeviceRequest::Cuda(_)),
        "heads: the text tower runs on the CPU (seconds to minutes, once per heads file); drop --device"
    );
    ensure!(precision == Precision::F32, "heads: computes in f32; drop --precision");
    for t in &args.templates {
        ensure!(t.contains("{}"), "--template {t:?}: no {{}} for the class name");
    }
    check_file_target("--out", &args.out)?;
    let dir = ModelDir::open(&args.clip)?;
    let tokenizer_dir = args.tokenizer.as_deref().unwrap_or(&dir.path);
    let tokenizer_files = ["vocab.json", "merges.txt", "tokenizer.json"].map(|f| tokenizer_dir.join(f));
    let sources = args.tasks.iter().map(|t| t.source.clone());
    let inputs: Vec<PathBuf> = dir.files().into_iter().chain(tokenizer_files).chain(sources).collect();
    check_not_an_input("--out", &args.out, &inputs)?;
    if dir.kind != ModelKind::Clip {
        bail!(
            "{}: a {}; zero-shot heads need the full CLIPModel with its text tower (the pretrained model the \
             experts were fine-tuned from, e.g. openai/clip-vit-base-patch32)",
            dir.path.display(),
            dir.kind.hf_name()
        );
    }
    let config = TextConfig::from_model_json(&dir.json, &dir.path.join("config.json"))?;
    let tokenizer = ClipTokenizer::open(args.tokenizer.as_deref().unwrap_or(&dir.path))
        .with_context(|| "the tokenizer (name its folder with --tokenizer when the model's has none)".to_string())?;
    let be = device::open(DeviceRequest::Cpu, true)?;
    let model = ClipText::load(be.as_ref(), &dir.store, &config)?;
    let templates: Vec<Vec<String>> = args
        .tasks
        .iter()
        .map(|task| match (&args.templates, &task.templates) {
            (given, _) if !given.is_empty() => given.clone(),
            (_, Some(own)) => own.clone(),
            (_, None) => vec![DEFAULT_TEMPLATE.to_string()],
        })
        .collect();
    let tasks: Vec<TaskPrompts> = args
        .tasks
        .iter()
        .zip(&templates)
        .map(|(task, templates)| TaskPrompts { name: &task.name, classes: &task.classes, templates })
        .collect();
    let prompts = tasks.iter().map(|t| t.classes.len() * t.templates.len()).sum();
    let bar = progress::counted("heads", prompts, "prompts", quiet);
    let made = class_embeddings(be.as_ref(), &model, &tokenizer, &tasks, &mut |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    let (mut tensors, mut classes) = (Vec::new(), serde_json::Map::new());
    for (task, head) in tasks.iter().zip(made.heads) {
        let shape = vec![task.classes.len(), config.projection_dim];
        tensors.push(NamedTensor { name: format!("head.{}", task.name), shape, values: head });
        classes.insert(task.name.to_string(), task.classes.to_vec().into());
    }
    if !quiet {
        for (task, given) in tasks.iter().zip(&args.tasks) {
            let (c, t) = (task.classes.len(), task.templates.len());
            let (c, t) = (count(c, "class", "classes"), count(t, "template", "templates"));
            eprintln!("{:>20}  {c:>13}  {t:>13}  from {}", task.name, given.source.display());
        }
        eprintln!(
            "{}, {} tokens up to their pooled ones, {} run (beginnings prompts share, once)",
            count(made.prompts, "prompt", "prompts"),
            made.tokens,
            made.computed
        );
    }
    // FusionBench's classifier uses the pretrained model's projection and scale: the file carries both.
    let v = &dir.config;
    if dir.has_projection() {
        let projection = dir.store.get("visual_projection.weight", &[v.projection_dim, v.hidden_size])?;
        tensors.push(NamedTensor {
            name: "visual_projection.weight".into(),
            shape: vec![v.projection_dim, v.hidden_size],
            values: projection.host()?.to_vec(),
        });
    }
    let logit_scale = dir.logit_scale()?;
    if let Some(scale) = logit_scale {
        tensors.push(NamedTensor { name: "logit_scale".into(), shape: vec![], values: vec![scale] });
    }
    let metadata = BTreeMap::from([("classes".to_string(), Value::Object(classes).to_string())]);
    write_safetensors_with_metadata(&args.out, &tensors, metadata)?;
    if !quiet {
        let scale =
            logit_scale.map_or("none (eval uses ln 100)".to_string(), |s| format!("{s:.4} (exp {:.2})", s.exp()));
        let projection = if dir.has_projection() {
            format!("[{}, {}]", v.projection_dim, v.hidden_size)
        } else {
            "none (eval takes the model's)".to_string()
        };
        eprintln!(
            "wrote {}: {}, projection {projection}, logit_scale {scale}",
            args.out.display(),
            count(args.tasks.len(), "head", "heads")
        );
    }
    Ok(())
}
