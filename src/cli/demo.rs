//! `wemoe-engine demo`: the whole job on the bundled suite. Evaluates the pretrained model, each expert on its
//! own task, weight averaging, task arithmetic, TIES-merging, layer-wise AdaMerging, WEMoE before adaptation,
//! WEMoE with every task routed to its own expert (the ceiling of routing) and WEMoE after test-time
//! adaptation, with the adaptation's curve; prints a table shaped like the paper's Table 2 and optionally writes
//! it as JSON.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use wemoe_engine::adapt::{adapt, AdaptOptions, RouterParams, Schedule};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::{self, Backend, DeviceChoice};
use wemoe_engine::eval::{Batching, Encoder, Evaluator};
use wemoe_engine::merge::{adamerging, merge, AdaMergingOptions, Expert, MergeMethod, MergeOptions, TiesOptions};
use wemoe_engine::model::{Heads, ImageEncoder, RouterActivation, Routing};
use wemoe_engine::output::{check_file_target, check_folder_target, check_not_an_input, is_empty_dir};
use wemoe_engine::partial::Partial;
use wemoe_engine::suite::Suite;

use super::{json_on_stdout, progress, write_json};

/// What the demo runs; the defaults are the settings measured in BENCHMARKS.md's demo section.
pub struct Args {
    pub suite: PathBuf,
    pub json: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub steps: u64,
    pub lr: f64,
    pub schedule: Schedule,
    pub routing: Routing,
    pub batch_size: usize,
    pub router_layers: usize,
    pub router_activation: RouterActivation,
    pub curve_points: u64,
}

/// One method's accuracy per task, in the suite's order.
struct Row {
    method: String,
    accuracy: Vec<f64>,
}

impl Row {
    fn average(&self) -> f64 {
        self.accuracy.iter().sum::<f64>() / self.accuracy.len() as f64
    }
}

/// The suite's inputs, opened once.
struct Opened {
    suite: Suite,
    be: Box<dyn Backend>,
    heads: Heads,
    data: Vec<Dataset>,
}

impl Opened {
    fn names(&self) -> Vec<String> {
        self.suite.task_names()
    }

    /// Accuracy of the model in `dir` on the tasks `which` (indices), each with `batching`.
    fn evaluate(
        &self,
        model: &ImageEncoder,
        dir: &Path,
        which: &[usize],
        batching: Batching,
        quiet: bool,
    ) -> Result<Vec<f64>> {
        let evaluator = Evaluator::new(self.be.as_ref(), Encoder::Resident(model), &self.heads, dir)?;
        let mut out = Vec::new();
        for &t in which {
            let name = &self.suite.tasks[t].name;
            let bar = progress::images(name, self.data[t].len(), quiet);
            let acc = evaluator.task(name, &self.data[t], batching, &mut |done| bar.set_position(done as u64))?;
            bar.finish_and_clear();
            out.push(acc.accuracy());
        }
        Ok(out)
    }
}

/// The temporary models' folder: `--work` when given (kept), else one under the system's temporary folder,
/// removed when the demo ends, fails or is interrupted.
struct WorkDir {
    path: PathBuf,
    /// Removed when dropped or on an interrupt: the temporary folder always; a `--work` folder this run made,
    /// until it holds a model ([`WorkDir::holds_a_model`]).
    scratch: RefCell<Option<Partial>>,
    /// The folder is `--work`'s: its models stay.
    keep: bool,
}

impl WorkDir {
    /// Refuses a `--work` that holds anything: the demo writes its models there (an empty folder, made ahead, is
    /// taken, as `merge --out` takes one); and a new one in a missing folder, as `merge --out` refuses it (made,
    /// the missing folders would stay behind a failed run).
    fn check(requested: Option<&Path>) -> Result<()> {
        match requested {
            Some(path) if path.exists() && !is_empty_dir(path) => {
                anyhow::bail!("{}: already exists; --work needs a new or empty folder", path.display())
            }
            Some(path) => check_folder_target("--work", path),
            None => Ok(()),
        }
    }

    fn new(requested: Option<&Path>) -> Result<Self> {
        Self::check(requested)?;
        let (path, keep) = match requested {
            Some(p) => (p.to_path_buf(), true),
            None => (std::env::temp_dir().join(format!("wemoe-demo-{}", std::process::id())), false),
        };
        // This process's own scratch name, left by an earlier process of the same id that was killed.
        if !keep && path.exists() {
            anyhow::bail!("{}: already exists; remove it, or give --work", path.display());
        }
        // A folder this run makes is scratch until it holds a model (the temporary one, always).
        let scratch = if path.exists() {
            None
        } else {
            // The scratch folder lives in the temporary directory, which TMPDIR may misname.
            let hint = if keep { "" } else { " (the demo's scratch folder, in TMPDIR or /tmp; or give --work)" };
            let made = Partial::make_scratch(path.clone());
            Some(made.with_context(|| format!("{}: cannot create{hint}", path.display()))?)
        };
        Ok(WorkDir { scratch: RefCell::new(scratch), path, keep })
    }

    /// A model is written: a `--work` folder this run made stays from now on (the temporary one still goes).
    fn holds_a_model(&self) {
        if self.keep {
            if let Some(scratch) = self.scratch.borrow_mut().take() {
                scratch.keep();
            }
        }
    }
}

fn info(quiet: bool, line: String) {
    if !quiet {
        eprintln!("{line}");
    }
}

pub fn run(args: &Args, device: DeviceChoice, quiet: bool) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be positive");
    anyhow::ensure!(args.curve_points > 0, "--curve-points must be positive");
    // Checked here as `adapt` checks them, not after the merges and AdaMerging have run.
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be a positive number, got {}", args.lr);
    WorkDir::check(args.work.as_deref())?;
    // The JSON comes last; a folder that is not there should stop the demo before minutes of work.
    let json_on_stdout = json_on_stdout(args.json.as_deref());
    if let Some(path) = args.json.as_ref().filter(|_| !json_on_stdout) {
        check_file_target("--json", path)?;
    }
    let start = Instant::now();
    let suite = Suite::open(&args.suite)?;
    let pretrained_dir = ModelDir::open(&suite.pretrained())?;
    if let Some(path) = args.json.as_ref().filter(|p| !json_on_stdout && p.exists()) {
        // The suite's files are the demo's inputs, as a model's and a dataset's are `eval`'s (checked
        // before the device opens, so that the refusal is the one line).
        let mut inputs = vec![suite.root.join("suite.json"), suite.heads()];
        inputs.extend(pretrained_dir.files());
        for task in &suite.tasks {
            inputs.push(suite.data(&task.name));
            inputs.extend(ModelDir::open(&suite.expert(&task.name))?.files());
        }
        check_not_an_input("--json", path, &inputs)?;
    }
    // The suite's heads and data too, before the device opens.
    Heads::check_tasks(&suite.heads(), suite.tasks.iter().map(|task| task.name.as_str()))?;
    let preprocess = Preprocess::for_model(&pretrained_dir.path, pretrained_dir.config.image_size)?;
    let mut data = Vec::new();
    let mut expert_dirs = Vec::new();
    for task in &suite.tasks {
        data.push(Dataset::open(&suite.data(&task.name), &preprocess, pretrained_dir.config.image_size)?);
        expert_dirs.push(ModelDir::open(&suite.expert(&task.name))?);
    }
    let be = device::open(device, quiet)?;
    let heads = Heads::open(be.as_ref(), &suite.heads())?;
    let opened = Opened { suite, be, heads, data };
    let names = opened.names();
    let all: Vec<usize> = (0..names.len()).collect();
    let plain = Batching { size: args.batch_size, routing: Routing::Sample };
    let wemoe_batching = Batching { size: args.batch_size, routing: args.routing };
    let work = WorkDir::new(args.work.as_deref())?;
    info(
        quiet,
        format!("suite {} ({} tasks), models in {}", opened.suite.root.display(), names.len(), work.path.display()),
    );
    let mut rows = Vec::new();

    info(quiet, "pretrained model".into());
    let model = ImageEncoder::load(opened.be.as_ref(), &pretrained_dir)?;
    rows.push(Row {
        method: "pretrained".into(),
        accuracy: opened.evaluate(&model, &pretrained_dir.path, &all, plain, quiet)?,
    });

    info(quiet, "each expert on its own task".into());
    let mut individual = Vec::new();
    let mut experts = Vec::new();
    for ((t, name), dir) in names.iter().enumerate().zip(expert_dirs) {
        let model = ImageEncoder::load(opened.be.as_ref(), &dir)?;
        individual.extend(opened.evaluate(&model, &dir.path, &[t], plain, quiet)?);
        experts.push(Expert { name: name.clone(), model: dir });
    }
    rows.push(Row { method: "individual".into(), accuracy: individual });

    let merged = |method: MergeMethod, router_activation: RouterActivation, out: &str| -> Result<ModelDir> {
        let options =
            MergeOptions { method, scaling: 0.3, router_layers: args.router_layers, router_activation, seed: 0 };
        let path = work.path.join(out);
        merge(&pretrained_dir, &experts, &options, &path, &mut |_, _| {})?;
        // The first model the demo writes (the others come after).
        work.holds_a_model();
        ModelDir::open(&path)
    };

    // The data-free baselines, at FusionBench's default settings.
    for (method, name, what) in [
        (MergeMethod::Average, "weight-averaging", "weight averaging"),
        (MergeMethod::TaskArithmetic, "task-arithmetic", "task arithmetic (λ 0.3)"),
        (MergeMethod::TiesMerging(TiesOptions::default()), "ties-merging", "TIES-merging (λ 0.3, top 20%, sum)"),
    ] {
        info(quiet, what.into());
        let dir = merged(method, RouterActivation::Identity, name)?;
        let model = ImageEncoder::load(opened.be.as_ref(), &dir)?;
        rows.push(Row { method: name.into(), accuracy: opened.evaluate(&model, &dir.path, &all, plain, quiet)? });
    }

    // Layer-wise AdaMerging at FusionBench's settings but for the step count, which is the demo's.
    let adamerging_options = AdaMergingOptions {
        steps: args.steps,
        batch_size: args.batch_size,
        checkpoint_every: args.steps,
        ..Default::default()
    };
    info(
        quiet,
        format!(
            "layer-wise AdaMerging: {} steps, Adam lr {}, {} images per task per step",
            adamerging_options.steps, adamerging_options.lr, adamerging_options.batch_size
        ),
    );
    let adamerging_start = Instant::now();
    let bar = progress::steps("adamerging", args.steps, quiet);
    let adamerged = work.path.join("adamerging");
    adamerging(
        opened.be.as_ref(),
        &pretrained_dir,
        &experts,
        &opened.heads,
        &names,
        &opened.data,
        &adamerging_options,
        &adamerged,
        false,
        &mut |s| {
            bar.set_position(s.step);
            bar.set_message(format!("{:.4}", s.loss));
        },
    )?;
    bar.finish_and_clear();
    let adamerging_seconds = adamerging_start.elapsed().as_secs_f64();
    let dir = ModelDir::open(&adamerged)?;
    let model = ImageEncoder::load(opened.be.as_ref(), &dir)?;
    rows.push(Row { method: "adamerging".into(), accuracy: opened.evaluate(&model, &dir.path, &all, plain, quiet)? });

    info(quiet, format!("WEMoE (routers of depth {}), before adaptation", args.router_layers));
    let wemoe = merged(MergeMethod::Wemoe, args.router_activation, "wemoe")?;
    let mut model = ImageEncoder::load(opened.be.as_ref(), &wemoe)?;
    rows.push(Row {
        method: "wemoe-unadapted".into(),
        accuracy: opened.evaluate(&model, &wemoe.path, &all, wemoe_batching, quiet)?,
    });

    // The oracle's coefficients are exactly one-hot, so its routers pass them through (identity).
    info(quiet, "WEMoE with each task routed to its own expert".into());
    let fixed = merged(MergeMethod::Wemoe, RouterActivation::Identity, "wemoe-oracle")?;
    let mut oracle_model = ImageEncoder::load(opened.be.as_ref(), &fixed)?;
    let fixed_routers = RouterParams::load(&oracle_model, &fixed.store)?;
    let mut oracle = Vec::new();
    for t in 0..names.len() {
        let one_hot: Vec<f32> = (0..names.len()).map(|k| if k == t { 1.0 } else { 0.0 }).collect();
        fixed_routers.constant(&one_hot)?.apply(opened.be.as_ref(), &mut oracle_model)?;
        oracle.extend(opened.evaluate(&oracle_model, &fixed.path, &[t], wemoe_batching, quiet)?);
    }
    drop(oracle_model);

    let options = AdaptOptions {
        steps: args.steps,
        lr: args.lr,
        batch_size: args.batch_size,
        routing: args.routing,
        schedule: args.schedule,
        seed: 0,
        checkpoint_every: args.steps,
    };
    info(
        quiet,
        format!(
            "test-time adaptation: {} steps, Adam lr {}, {} schedule, {} routing, {} images per task per step",
            args.steps,
            args.lr,
            schedule_name(args.schedule),
            routing_name(args.routing),
            args.batch_size
        ),
    );
    let every = args.steps.div_ceil(args.curve_points);
    let mut snapshots: Vec<(u64, f64, RouterParams)> = Vec::new();
    let task_paths: Vec<(String, PathBuf)> = names.iter().map(|n| (n.clone(), opened.suite.data(n))).collect();
    let bar = progress::steps("adapt", args.steps, quiet);
    let adapted_path = work.path.join("wemoe-adapted");
    let adapt_start = Instant::now();
    adapt(
        opened.be.as_ref(),
        &wemoe,
        &opened.heads,
        &task_paths,
        &opened.data,
        &options,
        &adapted_path,
        false,
        &mut |r| {
            bar.set_position(r.step);
            bar.set_message(format!("{:.4}", r.loss));
            if r.step % every == 0 || r.step == r.steps {
                snapshots.push((r.step, r.loss, r.routers.clone()));
            }
        },
    )?;
    bar.finish_and_clear();
    let adapt_seconds = adapt_start.elapsed().as_secs_f64();

    info(quiet, "the adaptation's curve (average accuracy against steps)".into());
    let mut curve = vec![(0u64, f64::NAN, rows.last().map_or(f64::NAN, Row::average))];
    let mut adapted = Vec::new();
    for (step, loss, routers) in &snapshots {
        routers.apply(opened.be.as_ref(), &mut model)?;
        adapted = opened.evaluate(&model, &wemoe.path, &all, wemoe_batching, true)?;
        curve.push((*step, *loss, adapted.iter().sum::<f64>() / adapted.len() as f64));
    }
    rows.push(Row { method: "wemoe".into(), accuracy: adapted });
    rows.push(Row { method: "wemoe-oracle".into(), accuracy: oracle });

    print_table(&names, &rows, json_on_stdout);
    say!(stderr if json_on_stdout; "");
    let routing = routing_name(args.routing);
    say!(stderr if json_on_stdout; "adaptation curve ({routing} routing): step, loss, average accuracy");
    for (step, loss, avg) in &curve {
        let loss = if loss.is_finite() { format!("{loss:8.4}") } else { format!("{:>8}", "-") };
        say!(stderr if json_on_stdout; "{step:>6}  {loss}  {:>6.2}%", 100.0 * avg);
    }
    let seconds = start.elapsed().as_secs_f64();
    say!(stderr if json_on_stdout; "");
    say!(
        stderr if json_on_stdout;
        "{:.0} s in all ({adamerging_seconds:.0} s AdaMerging, {adapt_seconds:.0} s adapting), on {}",
        seconds,
        opened.be.describe()
    );

    if let Some(path) = &args.json {
        let mut methods = Map::new();
        for row in &rows {
            let tasks: Map<String, Value> =
                names.iter().zip(&row.accuracy).map(|(n, a)| (n.clone(), json!(a))).collect();
            methods.insert(row.method.clone(), json!({"tasks": tasks, "average": row.average()}));
        }
        let curve: Vec<Value> = curve
            .iter()
            .map(|(step, loss, avg)| {
                let loss = if loss.is_finite() { json!(loss) } else { Value::Null };
                json!({"step": step, "loss": loss, "average": avg})
            })
            .collect();
        let report = json!({
            "methods": methods,
            "adaptation": {
                "steps": args.steps, "lr": args.lr, "schedule": schedule_name(args.schedule),
                "routing": routing_name(args.routing), "batch_size": args.batch_size,
                "router_layers": args.router_layers, "seconds": adapt_seconds, "curve": curve,
            },
            "adamerging": {
                "steps": adamerging_options.steps, "lr": adamerging_options.lr,
                "batch_size": adamerging_options.batch_size, "seconds": adamerging_seconds,
            },
            "seconds": seconds,
            "device": opened.be.describe(),
        });
        write_json(path, &report)?;
    }
    Ok(())
}

fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Constant => "constant",
        Schedule::Cosine => "cosine",
    }
}

fn routing_name(r: Routing) -> &'static str {
    match r {
        Routing::Sample => "sample",
        Routing::Batch => "batch",
    }
}

/// Methods as rows, tasks as columns, the average last (the paper's Table 2).
fn print_table(names: &[String], rows: &[Row], to_stderr: bool) {
    let first = rows.iter().map(|r| r.method.len()).max().unwrap_or(6).max(6);
    let widths: Vec<usize> = names.iter().map(|n| n.len().max(6)).collect();
    let mut header = format!("{:<first$}", "method");
    for (n, w) in names.iter().zip(&widths) {
        header += &format!("  {n:>w$}");
    }
    say!(stderr if to_stderr; "{header}  {:>7}", "average");
    for row in rows {
        let mut line = format!("{:<first$}", row.method);
        for (a, w) in row.accuracy.iter().zip(&widths) {
            line += &format!("  {:>w$.1}", 100.0 * a);
        }
        say!(stderr if to_stderr; "{line}  {:>7.1}", 100.0 * row.average());
    }
}
