//! `wemoe-engine info`: what a model directory holds, from its config and headers alone (and AdaMerging's
//! coefficients beside a model it made); or what a heads file holds (tasks, class counts and names,
//! projection, logit scale); or how far the run of an `adapt` or AdaMerging checkpoint got, and the command that
//! continues it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};
use wemoe_engine::adapt::{run_checkpoint, CheckpointSummary};
use wemoe_engine::checkpoint::{ModelDir, ModelKind, SafetensorsFile};
use wemoe_engine::config::json_f32;
use wemoe_engine::device::CpuBackend;
use wemoe_engine::merge::{read_coefficients, CoefficientsFile, Granularity, COEFFICIENTS_FILE};
use wemoe_engine::model::Heads;
use wemoe_engine::run_lock::RunLock;
use wemoe_engine::text::{ClipTokenizer, TextConfig};

use super::count;

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    if path.is_file() {
        return heads_file(path, as_json);
    }
    // The folder of a run that has not written its model yet (running, stopped, or killed): its checkpoint.
    if let Some(file) = run_checkpoint(path).filter(|_| !path.join("config.json").exists()) {
        return checkpoint(&file, as_json);
    }
    let dir = ModelDir::open(path)?;
    let c = &dir.config;
    let store = &dir.store;
    let vision_tensors = store.names().filter(|n| n.starts_with("vision_model.")).count();
    let vision_params = store.count_params("vision_model.");
    let projection = store.shape("visual_projection.weight").map(<[usize]>::to_vec);
    let logit_scale = dir.logit_scale()?;
    // Parameters by role: WEMoE's experts (base MLP and task vectors) and routers, and the rest.
    let experts_params = store
        .names()
        .filter(|n| n.contains(".mlp.base_model.") || n.contains(".mlp.task_vectors."))
        .filter_map(|n| store.shape(n))
        .map(|s| s.iter().product::<usize>())
        .sum::<usize>();
    let router_params = store
        .names()
        .filter(|n| n.contains(".mlp.gate."))
        .filter_map(|n| store.shape(n))
        .map(|s| s.iter().product::<usize>())
        .sum::<usize>();
    let shared_params = vision_params - experts_params - router_params;
    let (resident_bytes, streamed_bytes) = dir.weight_bytes();
    let wemoe = dir.wemoe.as_ref().map(|w| w.to_json());
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for name in store.names() {
        if let Some(d) = store.dtype(name) {
            *dtypes.entry(format!("{d:?}")).or_default() += 1;
        }
    }
    // A full CLIPModel's text tower: what `heads` needs (its tokenizer files too).
    let text = match dir.kind {
        ModelKind::Clip => Some(TextConfig::from_model_json(&dir.json, &path.join("config.json"))?),
        _ => None,
    };
    let text_params = store.count_params("text_model.") + store.count_params("text_projection.");
    let tokenizer = ClipTokenizer::files_in(&dir.path);
    let files: Vec<String> =
        store.files().iter().map(|f| f.path().file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let coefficients = trained_coefficients(path)?;
    if as_json {
        let report = json!({
            "path": path.display().to_string(),
            "kind": dir.kind.hf_name(),
            "config": c.to_json(),
            "tokens": c.tokens(),
            "vision_tensors": vision_tensors,
            "vision_parameters": vision_params,
            "parameters": {"shared": shared_params, "experts": experts_params, "routers": router_params},
            "weights_bytes": {"resident": resident_bytes, "streamed": streamed_bytes},
            "wemoe": wemoe,
            "merge": dir.json.get("merge"),
            "adaptation": dir.json.get("adaptation"),
            "coefficients": coefficients.as_ref().map(|(file, per_expert)| json!({
                "file": COEFFICIENTS_FILE,
                "granularity": file.granularity.name(),
                "experts": per_expert
                    .iter()
                    .map(|s| json!({"name": s.expert, "mean": s.mean, "min": json_f32(s.min), "max": json_f32(s.max)}))
                    .collect::<Vec<_>>(),
            })),
            "projection": projection,
            "logit_scale": logit_scale.map(json_f32),
            "text": text.as_ref().map(|t| json!({
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "vocab_size": t.vocab_size,
                "max_position_embeddings": t.max_position_embeddings,
                "projection_dim": t.projection_dim,
                "parameters": text_params,
                "tokenizer": tokenizer.map(|t| t.to_string()),
            })),
            "files": files,
            "dtypes": dtypes,
        });
        say!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    say!("model       {}", path.display());
    say!("kind        {}", dir.kind.hf_name());
    say!(
        "vision      width {}, mlp {}, layers {}, heads {}, image {}, patch {}, tokens {}, {:?}, eps {:e}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.image_size,
        c.patch_size,
        c.tokens(),
        c.hidden_act,
        c.layer_norm_eps
    );
    say!("parameters  {vision_params} in {vision_tensors} vision tensors");
    say!(
        "memory      {} of f32 weights resident, {} streamed (one encoder layer at a time)",
        mib(resident_bytes),
        mib(streamed_bytes)
    );
    if let Some(w) = &dir.wemoe {
        say!("wemoe       {}: {}", count(w.num_experts(), "expert", "experts"), w.experts.join(", "));
        say!(
            "routers     depth {}, activation {}, init_lambda {}",
            w.router_layers,
            w.router_activation.name(),
            w.init_lambda.map_or("unknown".into(), |l| l.to_string())
        );
        say!("split       shared {shared_params}, experts {experts_params}, routers {router_params}");
    }
    if let Some(merge) = dir.json.get("merge").and_then(Value::as_object) {
        // A model made by `merge`: its method, settings and experts, as config.json records them.
        let field = |k: &str| merge.get(k).map(shown);
        let settings: Vec<String> = [
            "scaling",
            "threshold",
            "merge_func",
            "router_layers",
            "router_activation",
            "steps",
            "lr",
            "batch_size",
            "seed",
            "granularity",
            "clamp_weights",
        ]
        .iter()
        .filter_map(|k| field(k).map(|v| format!("{k} {v}")))
        .collect();
        let experts: Vec<&str> =
            merge.get("experts").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let mut settings = if settings.is_empty() { String::new() } else { format!(" ({})", settings.join(", ")) };
        if let Some(tasks) = merge.get("tasks").and_then(Value::as_array) {
            // AdaMerging's unlabeled tasks.
            let tasks: Vec<String> = tasks.iter().map(shown).collect();
            settings.push_str(&format!(" on {}", tasks.join(", ")));
        }
        say!(
            "merged      {} of {}{settings} by {}",
            field("method").unwrap_or_else(|| "unknown method".into()),
            experts.join(", "),
            field("tool").unwrap_or_else(|| "an unknown tool".into())
        );
    }
    for run in dir.json.get("adaptation").and_then(Value::as_array).into_iter().flatten() {
        // Each `adapt` run that made this model, oldest first.
        let field = |k: &str| run.get(k).map_or("?".to_string(), shown);
        let tasks: Vec<&str> =
            run.get("tasks").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        say!(
            "adapted     {} steps, Adam lr {} ({}), {} images per task per step, {} routing, seed {}, on {} by {}",
            field("steps"),
            field("lr"),
            field("schedule"),
            field("batch_size"),
            field("routing"),
            field("seed"),
            tasks.join(", "),
            field("tool")
        );
    }
    if let Some((file, per_expert)) = &coefficients {
        let shown: Vec<String> = match file.granularity {
            Granularity::TaskWise => per_expert.iter().map(|s| format!("{} {:.4}", s.expert, s.mean)).collect(),
            Granularity::LayerWise => per_expert
                .iter()
                .map(|s| format!("{} {:.4} ({:.4} to {:.4})", s.expert, s.mean, s.min, s.max))
                .collect(),
        };
        let what = match file.granularity {
            Granularity::TaskWise => format!("task-wise ({COEFFICIENTS_FILE})"),
            Granularity::LayerWise => {
                format!("layer-wise ({COEFFICIENTS_FILE}), mean over {} tensors", file.parameters.len())
            }
        };
        say!("coefficients {what}: {}", shown.join(", "));
    }
    // As the model loads it: [projection_dim, hidden_size], else described rather than read as a matrix.
    let expected = [c.projection_dim, c.hidden_size];
    match &projection {
        Some(s) if *s == expected => say!("projection  {} -> {} (visual_projection.weight)", s[1], s[0]),
        Some(s) => say!(
            "projection  visual_projection.weight has shape {s:?}, not {expected:?} (projection_dim, hidden_size): \
             embed and eval refuse it"
        ),
        None => say!("projection  none"),
    }
    if let Some(s) = logit_scale {
        say!("logit_scale {s:.4} (exp {:.2})", s.exp());
    }
    if let Some(t) = &text {
        say!(
            "text        width {}, mlp {}, layers {}, heads {}, vocab {}, positions {}, {:?}; {text_params} parameters \
             with the projection to {}",
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.vocab_size,
            t.max_position_embeddings,
            t.hidden_act,
            t.projection_dim
        );
        match tokenizer {
            Some(files) => say!("tokenizer   {files} (wemoe-engine heads can make zero-shot heads from this model)"),
            None => say!("tokenizer   none here (wemoe-engine heads needs --tokenizer with this model)"),
        }
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
    say!("files       {} ({})", files.join(", "), dtypes.join(", "));
    Ok(())
}

/// One expert's trained AdaMerging coefficients: their mean and range.
struct ExpertCoefficients {
    expert: String,
    mean: f64,
    min: f32,
    max: f32,
}

/// The AdaMerging coefficients beside a merged model, when it has them, and each expert's summary.
fn trained_coefficients(dir: &Path) -> Result<Option<(CoefficientsFile, Vec<ExpertCoefficients>)>> {
    let path = dir.join(COEFFICIENTS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let file = read_coefficients(&path)?;
    let per = file.values.len() / file.experts.len().max(1);
    let summary = file
        .experts
        .iter()
        .zip(file.values.chunks(per.max(1)))
        .map(|(expert, row)| ExpertCoefficients {
            expert: expert.clone(),
            mean: row.iter().map(|&v| v as f64).sum::<f64>() / row.len().max(1) as f64,
            min: row.iter().copied().fold(f32::INFINITY, f32::min),
            max: row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        })
        .collect();
    Ok(Some((file, summary)))
}

/// A config.json value as `info` prints it: a string without its quotes, anything else as JSON.
fn shown(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_string)
}

/// A file given to `info`: a heads file, or else an error that says what `info` takes (a model's own
/// `config.json` or `model.safetensors` given for its folder, an embeddings file, a dataset).
fn heads_file(path: &Path, as_json: bool) -> Result<()> {
    let folder = path.parent().filter(|f| f.join("config.json").is_file());
    let hint = folder.map_or(String::new(), |f| format!("; for the model in its folder, give {}", f.display()));
    let takes = "info takes a model directory, a heads file (safetensors of head.* tensors) or a run's checkpoint";
    let takes = format!("{takes}{hint}");
    let file = match SafetensorsFile::open(path) {
        Ok(file) => file,
        // A damaged heads file should say how it is damaged; any other file, only what info takes.
        Err(err) if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) => {
            return Err(err.context(format!("{}: {takes}", path.display())));
        }
        Err(_) => bail!("{}: not a safetensors file; {takes}", path.display()),
    };
    if file.metadata("state").is_some() {
        return checkpoint(path, as_json);
    }
    ensure!(file.names().any(|n| n.starts_with("head.")), "{}: holds no head.* tensors; {takes}", path.display());
    heads(path, as_json)
}

/// An `adapt` or AdaMerging checkpoint: how far its run got, its arguments, and the command that continues it.
fn checkpoint(path: &Path, as_json: bool) -> Result<()> {
    let summary = CheckpointSummary::read(path)?;
    let folder = wemoe_engine::output::parent_folder(path);
    let out = folder.canonicalize().unwrap_or_else(|_| folder.to_path_buf());
    let command = resume_command(&summary, &out);
    let kind = if summary.is_adamerging() { "AdaMerging" } else { "adapt" };
    let running = RunLock::is_held(folder);
    if as_json {
        let report = json!({
            "path": path.display().to_string(),
            "kind": format!("{} checkpoint", kind.to_lowercase()),
            "running": running,
            "step": summary.step,
            "steps": summary.steps,
            "checkpoint_every": summary.checkpoint_every,
            "precision": summary.precision,
            "arguments": summary.arguments,
            "resume": command,
        });
        say!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    say!("checkpoint  {}", path.display());
    let of = summary.steps.map_or(String::new(), |n| format!(" of {n}"));
    let done = summary.steps.is_some_and(|n| summary.step >= n);
    let now = match (running, done) {
        (true, _) => " (running now: its process holds the folder)",
        (false, true) => " (every step done: the command below writes the model without another)",
        (false, false) => "",
    };
    say!("run         {kind}, step {}{of}{now}", summary.step);
    // One option a line, as a shell takes it: `wemoe-engine adapt \`, then `--model PATH \`, ...
    let mut lines: Vec<String> = vec![command[..2].iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ")];
    for word in &command[2..] {
        match lines.last_mut() {
            Some(line) if !word.starts_with("--") => *line = format!("{line} {}", shell_word(word)),
            _ => lines.push(shell_word(word)),
        }
    }
    say!("resume      {}", lines.join(" \\\n              "));
    if summary.steps.is_none() {
        say!("            (this checkpoint does not record --steps: add the run's, 1000 if it took the default)");
    }
    Ok(())
}

/// The command line that continues the run of `summary` in `out`: its arguments as the checkpoint records them,
/// then `--out`, `--steps`, `--checkpoint-every` and `--precision` where known, and `--resume`. Options the
/// checkpoint predates are left at their defaults, which is what its run had.
fn resume_command(summary: &CheckpointSummary, out: &Path) -> Vec<String> {
    let a = &summary.arguments;
    let mut words: Vec<String> = vec!["wemoe-engine".into()];
    let option = |words: &mut Vec<String>, flag: &str, key: &str| {
        if let Some(value) = a.get(key) {
            words.extend([flag.to_string(), shown(value)]);
        }
    };
    let pairs = |words: &mut Vec<String>, flag: &str, key: &str| {
        for pair in a.get(key).and_then(Value::as_array).into_iter().flatten() {
            let (name, path) = (pair.get(0).map(shown).unwrap_or_default(), pair.get(1).map(shown).unwrap_or_default());
            words.extend([flag.to_string(), format!("{name}={path}")]);
        }
    };
    if summary.is_adamerging() {
        words.extend(["merge", "--method", "adamerging"].map(String::from));
        option(&mut words, "--pretrained", "pretrained");
        pairs(&mut words, "--expert", "experts");
        option(&mut words, "--heads", "heads");
        pairs(&mut words, "--task", "tasks");
        option(&mut words, "--scaling", "init");
        option(&mut words, "--granularity", "granularity");
        if a.get("clamp_weights").and_then(Value::as_bool) == Some(true) {
            words.push("--clamp-weights".into());
        }
    } else {
        words.push("adapt".into());
        option(&mut words, "--model", "model");
        option(&mut words, "--heads", "heads");
        pairs(&mut words, "--task", "tasks");
        for (flag, key) in [("--routing", "routing"), ("--schedule", "schedule")] {
            // Recorded as the names' Rust spelling (`Sample`, `Cosine`); the options take them in lower case.
            if let Some(value) = a.get(key) {
                words.extend([flag.to_string(), shown(value).to_lowercase()]);
            }
        }
    }
    option(&mut words, "--lr", "lr");
    option(&mut words, "--batch-size", "batch_size");
    option(&mut words, "--seed", "seed");
    words.extend(["--out".to_string(), out.display().to_string()]);
    if let Some(steps) = summary.steps {
        words.extend(["--steps".to_string(), steps.to_string()]);
    }
    if let Some(every) = summary.checkpoint_every {
        words.extend(["--checkpoint-every".to_string(), every.to_string()]);
    }
    // A global option, after the command as clap takes it too; f32, the default, goes unsaid.
    if let Some(precision) = summary.precision.as_deref().filter(|p| *p != "f32") {
        words.extend(["--precision".to_string(), precision.to_string()]);
    }
    words.push("--resume".into());
    words
}

/// `word` as a POSIX shell reads it back: as it is where it holds only plain characters, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// A heads file: each task's class count, width and class names (when its metadata names them), the
/// projection and the raw logit scale it carries.
fn heads(path: &Path, as_json: bool) -> Result<()> {
    let heads = Heads::open(&CpuBackend::new(), path)?;
    let projection = heads.own_projection().map(|p| vec![p.out_features(), p.in_features()]);
    let logit_scale = heads.own_logit_scale();
    let tasks: Vec<(&str, usize, usize, Option<&[String]>)> = heads
        .task_names()
        .map(|t| {
            let head = heads.head(t).expect("a listed task");
            (t, head.out_features(), head.in_features(), heads.class_names(t))
        })
        .collect();
    if as_json {
        let tasks: serde_json::Map<String, serde_json::Value> = tasks
            .iter()
            .map(|(t, classes, width, names)| {
                (t.to_string(), json!({"classes": classes, "width": width, "class_names": names}))
            })
            .collect();
        let report = json!({
            "path": path.display().to_string(),
            "kind": "heads",
            "tasks": tasks,
            "projection": projection,
            "logit_scale": logit_scale.map(json_f32),
        });
        say!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    say!("heads       {}", path.display());
    let width = tasks.iter().map(|t| t.0.len()).max().unwrap_or(0);
    for (t, classes, dims, names) in &tasks {
        let names = names.map_or("no class names".to_string(), |n| {
            let shown: Vec<&str> = n.iter().take(5).map(String::as_str).collect();
            format!("{}{}", shown.join(", "), if n.len() > 5 { ", ..." } else { "" })
        });
        let classes = count(*classes, "class", "classes");
        say!("task        {t:<width$}  {classes} × {dims}: {names}");
    }
    match &projection {
        Some(s) => say!("projection  {} -> {} (visual_projection.weight; wins over the model's)", s[1], s[0]),
        None => say!("projection  none (the model's is used)"),
    }
    match logit_scale {
        Some(s) => say!("logit_scale {s:.4} (exp {:.2}; wins over the model's)", s.exp()),
        None => say!("logit_scale none (the model's, else ln 100)"),
    }
    Ok(())
}

/// `bytes` in MiB, to one decimal below 10.
fn mib(bytes: usize) -> String {
    let m = bytes as f64 / (1 << 20) as f64;
    if m < 10.0 {
        format!("{m:.1} MiB")
    } else {
        format!("{m:.0} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint summary of an adapt run with the given precision.
    fn summary(precision: Option<&str>) -> CheckpointSummary {
        let arguments = json!({
            "model": "/m", "heads": "/h.safetensors", "tasks": [["a", "/d/a b.safetensors"]], "lr": 0.001,
            "batch_size": 16, "routing": "Batch", "schedule": "Constant", "seed": 7,
        });
        CheckpointSummary {
            step: 5,
            steps: Some(9),
            checkpoint_every: Some(5),
            precision: precision.map(String::from),
            arguments,
        }
    }

    #[test]
    fn the_resume_command_repeats_the_runs_arguments_and_a_precision_other_than_f32() {
        let words = resume_command(&summary(Some("bf16")), Path::new("/o"));
        let want = "wemoe-engine adapt --model /m --heads /h.safetensors --task a=/d/a b.safetensors --routing batch \
                    --schedule constant --lr 0.001 --batch-size 16 --seed 7 --out /o --steps 9 --checkpoint-every 5 \
                    --precision bf16 --resume";
        assert_eq!(words.join(" "), want);
        let f32_run = resume_command(&summary(Some("f32")), Path::new("/o"));
        assert_eq!(f32_run, resume_command(&summary(None), Path::new("/o")));
        assert!(!f32_run.iter().any(|w| w == "--precision"), "{f32_run:?}");
        assert_eq!(shell_word("/d/a b.safetensors"), "'/d/a b.safetensors'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }
}
