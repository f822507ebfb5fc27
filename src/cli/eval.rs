//! `wemoe-engine eval`: top-1 accuracy per task through the heads, as a table and optionally JSON.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::device::DeviceChoice;
use wemoe_engine::eval::{labels_to_score, Batching, Evaluator, HeadRows, TaskAccuracy};
use wemoe_engine::output::{check_file_target, check_not_an_input};

use super::weights::{LoadedEncoder, Weights};
use super::{count, json_on_stdout, open_task_inputs, progress, write_json, TaskInputs};

pub struct Args {
    pub model: PathBuf,
    pub heads: PathBuf,
    pub tasks: Vec<(String, PathBuf)>,
    pub batching: Batching,
    pub json: Option<PathBuf>,
    pub weights: Weights,
}

pub fn run(args: &Args, device: DeviceChoice, quiet: bool) -> Result<()> {
    anyhow::ensure!(args.batching.size > 0, "--batch-size must be positive");
    // Check every input, and where the JSON goes, before computing anything.
    let json_on_stdout = json_on_stdout(args.json.as_deref());
    if let Some(path) = args.json.as_ref().filter(|_| !json_on_stdout) {
        check_file_target("--json", path)?;
        // Nor may it replace an input: the model's files, the heads, a data file (checked before the device
        // opens, so that the refusal is the one line).
        if path.exists() {
            let mut inputs = ModelDir::open(&args.model)?.files();
            inputs.push(args.heads.clone());
            inputs.extend(args.tasks.iter().map(|(_, data)| data.clone()));
            check_not_an_input("--json", path, &inputs)?;
        }
    }
    let TaskInputs { dir, be, heads, tasks } = open_task_inputs(&args.model, &args.heads, &args.tasks, device, quiet)?;
    let mut datasets = Vec::new();
    for (name, path, data) in tasks {
        let labels = labels_to_score(&data, &name)?;
        // An ImageFolder's ids are its class folders' sorted positions, a parquet's its ClassLabel's. Matched
        // to the head's rows by name where the heads file names them; else, with another count than the
        // head's, say so (a missing folder shifts the ids after it).
        let head_classes = heads.head(&name)?.out_features();
        let rows = HeadRows::for_task(&heads, &name, &data);
        rows.targets(labels, head_classes, &data, &name)?;
        match (&rows, data.classes()) {
            _ if quiet => {}
            (HeadRows::ByName(_), _) if !rows.is_identity() => eprintln!(
                "note: {}'s classes are matched to the rows of head '{name}' by name (the heads file names them)",
                path.display()
            ),
            (HeadRows::Ids, Some(names)) => {
                if let Some(head_names) = heads.class_names(&name) {
                    // Both name their classes, and some of the data's are not the head's (else they matched by name).
                    let missing = names.iter().find(|c| !head_names.contains(c)).map_or("", String::as_str);
                    eprintln!(
                        "note: {} names a class that head '{name}' does not ('{missing}'); its labels are taken as \
                         the head's class indices",
                        path.display()
                    )
                } else if names.len() != head_classes {
                    eprintln!(
                        "note: {} names {}, head '{name}' has {head_classes}; its labels are taken as the head's \
                         class indices",
                        path.display(),
                        count(names.len(), "class", "classes")
                    )
                }
            }
            _ => {}
        }
        datasets.push((name, data));
    }
    let model = LoadedEncoder::load(be.as_ref(), &dir, args.weights, quiet)?;
    let evaluator = Evaluator::new(be.as_ref(), model.encoder(), &heads, &dir.path)?;
    let mut results: Vec<TaskAccuracy> = Vec::new();
    for (name, data) in &datasets {
        let bar = progress::images(name, data.len(), quiet);
        let acc = evaluator.task(name, data, args.batching, &mut |done| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        results.push(acc);
    }
    let average = results.iter().map(TaskAccuracy::accuracy).sum::<f64>() / results.len() as f64;
    let width = results.iter().map(|r| r.task.len()).max().unwrap_or(4).max(7);
    say!(stderr if json_on_stdout; "{:<width$}  {:>7}  {:>8}", "task", "images", "accuracy");
    for r in &results {
        say!(stderr if json_on_stdout; "{:<width$}  {:>7}  {:>7.2}%", r.task, r.count, 100.0 * r.accuracy());
    }
    say!(stderr if json_on_stdout; "{:<width$}  {:>7}  {:>7.2}%", "average", "", 100.0 * average);
    if let Some(path) = &args.json {
        let tasks: serde_json::Map<String, serde_json::Value> =
            results.iter().map(|r| (r.task.clone(), json!({"accuracy": r.accuracy(), "count": r.count}))).collect();
        write_json(path, &json!({"tasks": tasks, "average": average}))?;
    }
    Ok(())
}
