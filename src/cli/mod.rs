//! Argument parsing and dispatch; each command in its own file.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use wemoe_engine::adapt::{AdaptOptions, Schedule};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::Backend;
use wemoe_engine::device::{self, DeviceChoice, DeviceRequest, Precision};
use wemoe_engine::eval::Batching;
use wemoe_engine::hub_cache::{HubCache, Located};
use wemoe_engine::merge::{AdaMergingOptions, Granularity, MergeMethod, MergeOptions, TiesMergeFunc, TiesOptions};
use wemoe_engine::model::Heads;
use wemoe_engine::model::{self, RouterActivation};
use wemoe_engine::suite::Suite;

/// Merge fine-tuned CLIP vision models with WEMoE, adapt, evaluate and run them.
#[derive(Parser, Debug)]
#[command(name = "wemoe-engine", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to compute: auto, cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "auto")]
    device: DeviceRequest,
    /// The products' arithmetic: f32 (exact), tf32 (GPU tensor cores, the forward's, within about 1e-3) or
    /// bf16 (GPU tensor cores, CPU AMX tiles or AMD's AVX-512 BF16, within about 1e-2; on the CPU the backward's
    /// through frozen weights too).
    #[arg(long, global = true, default_value = "f32")]
    precision: Precision,
    /// No progress and no informational lines.
    #[arg(long, global = true)]
    quiet: bool,
    /// CPU threads for the products, merges and image decoding, 1 to 1024 [default: RAYON_NUM_THREADS if set,
    /// else every logical CPU]. The CPU's results do not depend on it: every sum runs in the same order whatever
    /// the count.
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    threads: Option<u32>,
}

/// The most `--threads` takes: past a few thousand, starting the pool alone takes many seconds (100000 took
/// minutes), which a typo should not cost.
const MAX_THREADS: u32 = 1024;

/// How WEMoE layers route: each sample its own coefficients, or the batch's average.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Routing {
    /// Per-sample merge coefficients.
    #[default]
    Sample,
    /// Coefficients averaged over consecutive, unshuffled batches.
    Batch,
}

impl Routing {
    fn batching(self, size: usize) -> Batching {
        let routing = match self {
            Routing::Sample => model::Routing::Sample,
            Routing::Batch => model::Routing::Batch,
        };
        Batching { size, routing }
    }
}

/// `--method` of merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// Weight-Ensembling MoE: routers and per-sample merged MLPs.
    Wemoe,
    /// θ0 + λ·Σ (θ_t − θ0).
    TaskArithmetic,
    /// θ0 + λ·TIES(θ_t − θ0): each task vector trimmed to its largest entries, signs elected, the agreeing
    /// entries merged (FusionBench's TiesMergingAlgorithm).
    TiesMerging,
    /// The mean of the experts.
    Average,
    /// AdaMerging: θ0 + Σ_t λ[t, p]·τ_t per parameter tensor p (or one λ[t] for all with --granularity
    /// task-wise), the coefficients trained by Adam on the entropy of unlabeled test batches (FusionBench's
    /// CLIPLayerWiseAdaMergingAlgorithm, CLIPTaskWiseAdaMergingAlgorithm); needs --heads and --task.
    Adamerging,
}

/// `--granularity` of AdaMerging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GranularityArg {
    /// A coefficient per expert and parameter tensor (FusionBench's clip_layer_wise_adamerging).
    LayerWise,
    /// A coefficient per expert (clip_task_wise_adamerging).
    TaskWise,
}

/// `--merge-func` of TIES-merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TiesFunc {
    /// The sum of the entries that agree with the elected sign.
    Sum,
    /// Their mean.
    Mean,
    /// The largest magnitude among them, with the elected sign.
    Max,
}

/// `--schedule` of adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LrSchedule {
    /// The same learning rate every step (FusionBench).
    Constant,
    /// Cosine annealing to zero over the run (the paper's code).
    Cosine,
}

impl From<LrSchedule> for Schedule {
    fn from(s: LrSchedule) -> Self {
        match s {
            LrSchedule::Constant => Schedule::Constant,
            LrSchedule::Cosine => Schedule::Cosine,
        }
    }
}

impl From<RouterAct> for RouterActivation {
    fn from(a: RouterAct) -> Self {
        match a {
            RouterAct::Identity => RouterActivation::Identity,
            RouterAct::Softmax => RouterActivation::Softmax,
        }
    }
}

/// The demo's adaptation steps by default (BENCHMARKS.md, demo section).
const DEMO_STEPS: u64 = 300;
/// The demo's learning rate by default: with softmax routers, 3e-3 and 1e-2 end within 0.1 point of each other
/// on the bundled suite (BENCHMARKS.md, demo section).
const DEMO_LR: f64 = 3e-3;

/// `--router-activation` of merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RouterAct {
    /// The router's outputs are the coefficients (the reference).
    Identity,
    /// Softmax over experts.
    Softmax,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Describe a model directory (kind, dimensions, parameters, files), a heads file (tasks, classes), or a run's
    /// checkpoint (its step, and the command that resumes it).
    Info {
        /// An HF CLIP or WEMoE directory, a heads file, an adapt or AdaMerging checkpoint (or the --out folder
        /// holding it), or a Hub name in the Hugging Face cache
        /// (OWNER/NAME[@REVISION]).
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Merge a pretrained CLIP vision model and fine-tuned copies into one model.
    Merge {
        /// The pretrained model: a directory, or a Hub name in the Hugging Face cache (OWNER/NAME[@REVISION]).
        #[arg(long)]
        pretrained: PathBuf,
        /// A fine-tuned model and its task name, NAME=MODEL (MODEL as --pretrained's); repeat for each (kept in
        /// this order).
        #[arg(long = "expert", value_name = "NAME=MODEL")]
        experts: Vec<String>,
        /// The output directory: new or empty (for AdaMerging, or holding its checkpoint, with --resume).
        #[arg(long)]
        out: PathBuf,
        /// How to merge.
        #[arg(long, value_enum, default_value = "wemoe")]
        method: Method,
        /// λ: the task vectors' scaling (task arithmetic, TIES-merging, WEMoE's shared parameters), the
        /// WEMoE routers' initial bias and AdaMerging's initial coefficients; unused by averaging [default: 0.3].
        #[arg(long, allow_negative_numbers = true)]
        scaling: Option<f32>,
        /// TIES-merging: the share of each task vector's entries kept by magnitude, a percentage above 1, else
        /// a fraction, as FusionBench reads it [default: 20].
        #[arg(long, allow_negative_numbers = true)]
        threshold: Option<f64>,
        /// TIES-merging: how the entries that agree with the elected sign are combined [default: sum].
        #[arg(long, value_enum)]
        merge_func: Option<TiesFunc>,
        /// WEMoE router depth: 0, 1 or 2 [default: 2].
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
        router_layers: Option<u8>,
        /// WEMoE router activation before the token mean [default: identity].
        #[arg(long, value_enum)]
        router_activation: Option<RouterAct>,
        /// Seed of the routers' initialisation (WEMoE) or of the tasks' shuffled streams (AdaMerging)
        /// [default: 0].
        #[arg(long)]
        seed: Option<u64>,
        /// AdaMerging: the heads file (safetensors with head.<TASK>).
        #[arg(long)]
        heads: Option<PathBuf>,
        /// AdaMerging: a task and its unlabeled data, NAME=DATA (DATA as adapt's --task); repeat for each.
        #[arg(long = "task", value_name = "NAME=DATA")]
        tasks: Vec<String>,
        /// AdaMerging: Adam steps [default: 1000].
        #[arg(long)]
        steps: Option<u64>,
        /// AdaMerging: Adam's learning rate [default: 1e-3].
        #[arg(long, allow_negative_numbers = true)]
        lr: Option<f64>,
        /// AdaMerging: images per task per step [default: 16].
        #[arg(long)]
        batch_size: Option<usize>,
        /// AdaMerging: steps between checkpoints in --out [default: 100].
        #[arg(long)]
        checkpoint_every: Option<u64>,
        /// AdaMerging: continue from the checkpoint in --out.
        #[arg(long)]
        resume: bool,
        /// AdaMerging: clamp every coefficient to [0, 1] where the merge uses it (FusionBench's clamp_weights).
        #[arg(long)]
        clamp_weights: bool,
        /// AdaMerging: a coefficient per expert and parameter tensor, or per expert [default: layer-wise].
        #[arg(long, value_enum)]
        granularity: Option<GranularityArg>,
    },
    /// Write pooled outputs and image embeddings of a dataset to safetensors.
    Embed {
        /// The model directory, or a Hub name in the Hugging Face cache (OWNER/NAME[@REVISION]).
        #[arg(long)]
        model: PathBuf,
        /// The images: a safetensors file (pixel_values or images), an ImageFolder directory (class
        /// subfolders of images), a folder of images or one image file (unlabelled; the output's metadata lists
        /// the files of any of these, one per row), a Hugging Face datasets parquet file, folder of one split's
        /// shards, or split prefix (data/test), or a Hub dataset in the Hugging Face cache,
        /// OWNER/NAME[@REVISION][:[CONFIG/]SPLIT] (split test by default).
        #[arg(long)]
        images: PathBuf,
        /// The output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Routing of WEMoE layers.
        #[arg(long, value_enum, default_value_t)]
        routing: Routing,
        /// Images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Where the encoder layers live: `streamed` loads one at a time per span of batches (peak memory
        /// about one layer's weights); `auto` streams on the CPU and keeps the model resident on a GPU whose
        /// free memory holds it.
        #[arg(long, value_enum, default_value_t)]
        weights: weights::Weights,
    },
    /// Top-1 accuracy on labelled tasks through zero-shot heads.
    Eval {
        #[command(flatten)]
        inputs: TaskArgs,
        /// Routing of WEMoE layers.
        #[arg(long, value_enum, default_value_t)]
        routing: Routing,
        /// Images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Also write the results as JSON to this file; `-` for stdout (the table then goes to stderr).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Where the encoder layers live: `streamed` loads one at a time per span of batches (peak memory
        /// about one layer's weights); `auto` streams on the CPU and keeps the model resident on a GPU whose
        /// free memory holds it.
        #[arg(long, value_enum, default_value_t)]
        weights: weights::Weights,
    },
    /// Adapt a WEMoE model's routers on unlabeled task data (entropy minimisation).
    Adapt {
        #[command(flatten)]
        inputs: TaskArgs,
        /// The output directory: checkpoints, then the adapted model; new, empty, or holding an adapt checkpoint.
        #[arg(long)]
        out: PathBuf,
        /// Adaptation steps in all.
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Adam's learning rate.
        #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
        lr: f64,
        /// Images per task per step.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Routing during adaptation.
        #[arg(long, value_enum, default_value_t)]
        routing: Routing,
        /// Learning-rate schedule.
        #[arg(long, value_enum, default_value = "constant")]
        schedule: LrSchedule,
        /// Seed of the tasks' shuffled streams.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Steps between checkpoints in --out.
        #[arg(long, default_value_t = 100)]
        checkpoint_every: u64,
        /// Continue from the checkpoint in --out.
        #[arg(long)]
        resume: bool,
    },
    /// Zero-shot classification heads from a CLIP model's text tower, as FusionBench computes them: each class
    /// name in every template, the prompts' projected embeddings normalised, averaged, normalised again.
    Heads {
        /// The full CLIPModel (text tower and projections) the experts were fine-tuned from: a directory, or a
        /// Hub name in the Hugging Face cache (OWNER/NAME[@REVISION]).
        #[arg(long)]
        clip: PathBuf,
        /// The folder (or Hub name) holding vocab.json and merges.txt (or tokenizer.json), when --clip's has none.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A task and where its class names come from, NAME[=SOURCE] (SOURCE NAME when absent); repeat for each.
        /// SOURCE: a JSON list of names, or {"classes": [...], "templates": [...]} (what
        /// tools/fusionbench_classes.py writes for a FusionBench task); a text file, one name per line; an
        /// ImageFolder (its class folders); or a parquet dataset, by path or Hub name, its ClassLabel names.
        #[arg(long = "task", required = true, value_name = "NAME[=SOURCE]")]
        tasks: Vec<String>,
        /// A prompt with {} for the class name; repeat for several. Replaces every task's templates (default:
        /// the source's own, else FusionBench's "a photo of a {}").
        #[arg(long = "template", value_name = "TEXT")]
        templates: Vec<String>,
        /// The heads file to write (safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the whole job on the bundled suite and print the table.
    Demo {
        /// Also write the results as JSON to this file; `-` for stdout (the table then goes to stderr).
        #[arg(long)]
        json: Option<PathBuf>,
        /// The suite's directory (default: $WEMOE_SUITE, else the bundled assets/suite).
        #[arg(long)]
        suite: Option<PathBuf>,
        /// Keep the merged and adapted models in this new or empty folder (default: a temporary one, removed).
        #[arg(long)]
        work: Option<PathBuf>,
        /// Adaptation steps.
        #[arg(long, default_value_t = DEMO_STEPS)]
        steps: u64,
        /// Adam's learning rate for the routers.
        #[arg(long, default_value_t = DEMO_LR, allow_negative_numbers = true)]
        lr: f64,
        /// Learning-rate schedule.
        #[arg(long, value_enum, default_value = "constant")]
        schedule: LrSchedule,
        /// WEMoE's routing, in adaptation and evaluation.
        #[arg(long, value_enum, default_value = "batch")]
        routing: Routing,
        /// Images per task per adaptation step, and per evaluation batch (batch routing averages over it).
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Router depth of the WEMoE merge.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
        router_layers: u8,
        /// Router activation of the WEMoE merge. Softmax by default here (merge's default is the reference's
        /// identity): unbounded identity routers extrapolate past the experts at this scale (BENCHMARKS.md).
        #[arg(long, value_enum, default_value = "softmax")]
        router_activation: RouterAct,
        /// Points on the adaptation's curve (each an evaluation of every task).
        #[arg(long, default_value_t = 10)]
        curve_points: u64,
    },
    /// Report devices, versions and kernels.
    Doctor {
        /// Compile the kernels for this architecture (sm_XY).
        #[arg(long)]
        arch: Option<String>,
    },
}

/// Prints a line on stdout ([`stdout::note`]: a closed stdout, the output piped into `head`, is not an error;
/// another failed write fails the command at its end). With `stderr if COND;` first, the line goes to stderr
/// where COND holds: a table beside `--json -`.
macro_rules! say {
    (stderr if $to_stderr:expr; $($arg:tt)*) => {{
        use std::io::Write as _;
        if $to_stderr {
            let _ = writeln!(std::io::stderr().lock(), $($arg)*);
        } else {
            $crate::cli::stdout::note(writeln!(std::io::stdout().lock(), $($arg)*));
        }
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::cli::stdout::note(writeln!(std::io::stdout().lock(), $($arg)*));
    }};
}

/// `--json -`: the JSON goes to stdout, as `-` means for Unix tools, and the command's table to stderr, so that
/// stdout is the JSON alone (`eval --json - | jq .average`). `./-` is still a file named `-`.
pub fn json_on_stdout(json: Option<&Path>) -> bool {
    json.is_some_and(|p| p == Path::new("-"))
}

/// Writes a command's JSON report, pretty and ending in a newline: to `path` atomically, or to stdout for `-`.
pub fn write_json(path: &Path, report: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    if json_on_stdout(Some(path)) {
        use std::io::Write as _;
        // As the tables: a closed stdout (piped into `head`) is not an error, a full disk is, at the end.
        stdout::note(std::io::stdout().lock().write_all(text.as_bytes()));
        return Ok(());
    }
    wemoe_engine::output::write_atomic(path, text.as_bytes())
}

mod adapt;
mod demo;
mod doctor;
mod embed;
mod eval;
mod heads;
mod info;
mod merge;
mod progress;
pub mod stdout;
mod weights;

/// A model, its heads and tasks: what eval and adapt share.
#[derive(clap::Args, Debug)]
struct TaskArgs {
    /// The model directory, or a Hub name in the Hugging Face cache (OWNER/NAME[@REVISION]).
    #[arg(long)]
    model: PathBuf,
    /// The heads file (safetensors with head.<TASK>).
    #[arg(long)]
    heads: PathBuf,
    /// A task and its data, NAME=DATA; repeat for each. DATA as embed's --images: safetensors, an
    /// ImageFolder directory (or, for adapt, which needs no labels, a folder of images), datasets parquet (a
    /// file, a folder of one split's shards, or data/test), or a Hub dataset in the Hugging Face cache
    /// (OWNER/NAME[@REVISION][:[CONFIG/]SPLIT], split test by default).
    #[arg(long = "task", required = true, value_name = "NAME=DATA")]
    tasks: Vec<String>,
}

/// Every input of a command over tasks, checked before anything is computed.
pub struct TaskInputs {
    pub dir: ModelDir,
    pub be: Box<dyn Backend>,
    pub heads: Heads,
    /// Each task's name, path and data, in the order given.
    pub tasks: Vec<(String, PathBuf, Dataset)>,
}

/// Opens the model, the device, the heads (which must have every task) and each task's data.
pub fn open_task_inputs(
    model: &Path,
    heads: &Path,
    tasks: &[(String, PathBuf)],
    device: DeviceChoice,
    quiet: bool,
) -> Result<TaskInputs> {
    let mut seen = std::collections::BTreeSet::new();
    for (name, _) in tasks {
        if !seen.insert(name) {
            bail!("--task '{name}' is given twice");
        }
    }
    // Every input is checked before the device opens (on a GPU, seconds), so that a refusal comes first and alone.
    let dir = ModelDir::open(model)?;
    Heads::check_tasks(heads, tasks.iter().map(|(name, _)| name.as_str()))?;
    let preprocess = Preprocess::for_model(&dir.path, dir.config.image_size)?;
    let mut opened = Vec::new();
    for (name, path) in tasks {
        opened.push((name.clone(), path.clone(), Dataset::open(path, &preprocess, dir.config.image_size)?));
    }
    let be = device::open(device, quiet)?;
    let heads = Heads::open(be.as_ref(), heads)?;
    Ok(TaskInputs { dir, be, heads, tasks: opened })
}

impl TaskArgs {
    /// The model and each task's name and data, Hub names found in the Hugging Face cache.
    fn located(&self, names: &mut HubNames) -> Result<(PathBuf, Vec<(String, PathBuf)>)> {
        let model = names.model(self.model.clone())?;
        let tasks = self
            .tasks
            .iter()
            .map(|t| parse_named("task", t).and_then(|(n, p)| Ok((n, names.data(p)?))))
            .collect::<Result<Vec<_>>>()?;
        Ok((model, tasks))
    }
}

/// The model and data arguments of a command: each the path given, or for a Hub name what the Hugging Face
/// cache holds under it. What each name stood for is said once every argument has resolved, so that a
/// refusal stays the one line on stderr.
struct HubNames {
    hub: HubCache,
    notes: Vec<String>,
}

impl HubNames {
    fn new() -> Self {
        HubNames { hub: HubCache::from_env(), notes: Vec::new() }
    }

    fn model(&mut self, spec: PathBuf) -> Result<PathBuf> {
        let located = self.hub.locate_model(&spec)?;
        Ok(self.noted(located))
    }

    fn data(&mut self, spec: PathBuf) -> Result<PathBuf> {
        let located = self.hub.locate_data(&spec)?;
        Ok(self.noted(located))
    }

    fn noted(&mut self, located: Located) -> PathBuf {
        self.notes.extend(located.note);
        located.path
    }

    /// Says, on stderr, what each Hub name stood for.
    fn say(self, quiet: bool) {
        for note in self.notes.iter().filter(|_| !quiet) {
            eprintln!("note: {note}");
        }
    }
}

/// What `adapt` and AdaMerging note about a run (nothing when `quiet`): each task with fewer images than
/// `--batch-size`, which the sampler takes whole every step (`TaskSampler::next_batch`) while the run's record
/// still gives the batch size asked for; and a `--resume` whose `checkpoint` is not there yet, which starts at
/// step 0. Said once the first step is taken ([`say_notes`]), so that an argument's error stays one line.
fn run_notes<'a>(
    tasks: impl IntoIterator<Item = (&'a str, usize)>,
    batch_size: usize,
    resume: Option<&Path>,
    precision: Precision,
    quiet: bool,
) -> Vec<String> {
    if quiet {
        return Vec::new();
    }
    let mut notes: Vec<String> = tasks
        .into_iter()
        .filter(|&(_, images)| images < batch_size)
        .map(|(name, n)| {
            format!(
                "task '{name}' has {}, fewer than --batch-size {batch_size}; each step takes all of them",
                images(n)
            )
        })
        .collect();
    if let Some(checkpoint) = resume.filter(|c| !c.exists()) {
        notes.push(format!("--resume: {} does not exist yet; starting at step 0", checkpoint.display()));
    }
    // Another precision is allowed (a GPU's bf16 run finished on a CPU, say), but its steps are not the original's.
    let made_in = resume.and_then(|c| wemoe_engine::adapt::CheckpointSummary::read(c).ok()?.precision);
    if let Some(made_in) = made_in.filter(|p| *p != precision.to_string()) {
        notes.push(format!(
            "--resume: the checkpoint was made with --precision {made_in}, this run computes in {precision}: its \
             remaining steps differ from the first run's"
        ));
    }
    notes
}

/// Prints `notes` above the progress bar, once.
fn say_notes(bar: &indicatif::ProgressBar, notes: &mut Vec<String>) {
    if !notes.is_empty() {
        bar.suspend(|| notes.drain(..).for_each(|n| eprintln!("note: {n}")));
    }
}

/// Splits `NAME=PATH` of option `--{flag}`.
fn parse_named(flag: &str, spec: &str) -> Result<(String, PathBuf)> {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => {
            let what = if flag == "task" { "NAME=DATA" } else { "NAME=MODEL" };
            bail!("--{flag} '{spec}': expected {what}")
        }
    }
}

/// "1 image", "2 images": a count as messages say it, the noun in the singular for one.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "1 image", "2 images".
fn images(n: usize) -> String {
    count(n, "image", "images")
}

/// The environment variable rayon sizes its pool by, which `--threads` overrides.
const THREADS_ENV: &str = "RAYON_NUM_THREADS";

/// The thread count asked for and how it was asked (for messages): `--threads`, else [`THREADS_ENV`] held to the
/// same range (rayon itself would start any count it names, and take a word for its default silently). Unset,
/// empty or 0 (rayon's "every logical CPU") leave rayon's default.
fn thread_request(flag: Option<u32>, env: Option<std::ffi::OsString>) -> Result<Option<(u32, String)>> {
    if let Some(n) = flag {
        return Ok(Some((n, format!("--threads {n}"))));
    }
    let Some(value) = env else { return Ok(None) };
    let text = value.to_string_lossy();
    match text.trim().parse::<u32>() {
        _ if text.trim().is_empty() => Ok(None),
        Ok(0) => Ok(None),
        Ok(n) if n <= MAX_THREADS => Ok(Some((n, format!("{THREADS_ENV}={n}")))),
        _ => bail!(
            "{THREADS_ENV}='{text}': expected a thread count from 1 to {MAX_THREADS} (0 or unset: every logical CPU)"
        ),
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    if let Some((n, from)) = thread_request(cli.threads, std::env::var_os(THREADS_ENV))? {
        // Before anything runs on rayon's global pool, which would otherwise start with its default size.
        rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global()
            .map_err(|e| anyhow::anyhow!("{from}: cannot start the thread pool: {e}"))?;
        let cpus = std::thread::available_parallelism().map_or(1, |p| p.get());
        if n as usize > cpus && !cli.quiet {
            eprintln!("note: {from} is more than this machine's {cpus} logical CPUs; the threads will share them");
        }
    }
    let (device, quiet) = (DeviceChoice { request: cli.device, precision: cli.precision }, cli.quiet);
    let mut names = HubNames::new();
    match cli.command {
        Command::Info { model, json } => {
            let model = names.model(model)?;
            names.say(quiet);
            info::run(&model, json)
        }
        Command::Merge {
            pretrained,
            experts,
            out,
            method,
            scaling,
            threshold,
            merge_func,
            router_layers,
            router_activation,
            seed,
            heads,
            tasks,
            steps,
            lr,
            batch_size,
            checkpoint_every,
            resume,
            clamp_weights,
            granularity,
        } => {
            if method != Method::TiesMerging && (threshold.is_some() || merge_func.is_some()) {
                let flag = if threshold.is_some() { "--threshold" } else { "--merge-func" };
                bail!("{flag} applies to --method ties-merging only");
            }
            let adaptive = [
                ("--heads", heads.is_some()),
                ("--task", !tasks.is_empty()),
                ("--steps", steps.is_some()),
                ("--lr", lr.is_some()),
                ("--batch-size", batch_size.is_some()),
                ("--checkpoint-every", checkpoint_every.is_some()),
                ("--resume", resume),
                ("--clamp-weights", clamp_weights),
                ("--granularity", granularity.is_some()),
            ];
            if method != Method::Adamerging {
                if let Some((flag, _)) = adaptive.iter().find(|(_, given)| *given) {
                    bail!("{flag} applies to --method adamerging only");
                }
            }
            // The contract's settings (DESIGN.md 4) are accepted with every method, since other tools may pass
            // them all; where a method has no use for one, a note says so rather than leave it silently unused.
            let unused = [
                ("--router-layers", router_layers.is_some() && method != Method::Wemoe),
                ("--router-activation", router_activation.is_some() && method != Method::Wemoe),
                ("--seed", seed.is_some() && !matches!(method, Method::Wemoe | Method::Adamerging)),
                ("--scaling", scaling.is_some() && method == Method::Average),
            ];
            let name = method.to_possible_value().expect("every method is a possible value");
            for (flag, _) in unused.iter().filter(|(_, unused)| *unused && !quiet) {
                eprintln!("note: {flag} has no effect with --method {}", name.get_name());
            }
            let (scaling, seed) = (scaling.unwrap_or(0.3), seed.unwrap_or(0));
            let pretrained = names.model(pretrained)?;
            let experts = experts
                .iter()
                .map(|e| parse_named("expert", e).and_then(|(n, p)| Ok((n, names.model(p)?))))
                .collect::<Result<Vec<_>>>()?;
            if !quiet {
                merge::repeated_models(&pretrained, &experts).iter().for_each(|n| eprintln!("note: {n}"));
                let activation: RouterActivation = router_activation.map_or(RouterActivation::Identity, Into::into);
                if method == Method::Wemoe && activation.routes_every_input_alike(experts.len()) {
                    eprintln!("note: {}", merge::ROUTES_ALIKE);
                }
            }
            let data_free = |method| {
                merge::Job::DataFree(MergeOptions {
                    method,
                    scaling,
                    router_layers: router_layers.map_or(2, usize::from),
                    router_activation: router_activation.map_or(RouterActivation::Identity, Into::into),
                    seed,
                })
            };
            let job = match method {
                Method::Wemoe => data_free(MergeMethod::Wemoe),
                Method::TaskArithmetic => data_free(MergeMethod::TaskArithmetic),
                Method::Average => data_free(MergeMethod::Average),
                Method::TiesMerging => {
                    let defaults = TiesOptions::default();
                    data_free(MergeMethod::TiesMerging(TiesOptions {
                        threshold: threshold.unwrap_or(defaults.threshold),
                        merge_func: match merge_func {
                            None => defaults.merge_func,
                            Some(TiesFunc::Sum) => TiesMergeFunc::Sum,
                            Some(TiesFunc::Mean) => TiesMergeFunc::Mean,
                            Some(TiesFunc::Max) => TiesMergeFunc::Max,
                        },
                    }))
                }
                Method::Adamerging => {
                    let heads = heads.context("--method adamerging needs --heads (the tasks' zero-shot heads)")?;
                    ensure!(!tasks.is_empty(), "--method adamerging needs at least one --task NAME=DATA (unlabeled)");
                    let tasks = tasks
                        .iter()
                        .map(|t| parse_named("task", t).and_then(|(n, p)| Ok((n, names.data(p)?))))
                        .collect::<Result<Vec<_>>>()?;
                    let defaults = AdaMergingOptions::default();
                    let options = AdaMergingOptions {
                        init: scaling,
                        steps: steps.unwrap_or(defaults.steps),
                        lr: lr.unwrap_or(defaults.lr),
                        batch_size: batch_size.unwrap_or(defaults.batch_size),
                        seed,
                        checkpoint_every: checkpoint_every.unwrap_or(defaults.checkpoint_every),
                        clamp: clamp_weights,
                        granularity: match granularity {
                            None | Some(GranularityArg::LayerWise) => Granularity::LayerWise,
                            Some(GranularityArg::TaskWise) => Granularity::TaskWise,
                        },
                    };
                    merge::Job::AdaMerging { heads, tasks, options, device, resume }
                }
            };
            names.say(quiet);
            merge::run(&merge::Args { pretrained, experts, out, job }, quiet)
        }
        Command::Adapt { inputs, out, steps, lr, batch_size, routing, schedule, seed, checkpoint_every, resume } => {
            let ((model, tasks), heads) = (inputs.located(&mut names)?, inputs.heads);
            names.say(quiet);
            let options = AdaptOptions {
                steps,
                lr,
                batch_size,
                routing: routing.batching(batch_size).routing,
                schedule: schedule.into(),
                seed,
                checkpoint_every,
            };
            adapt::run(&adapt::Args { model, heads, tasks, out, options, resume }, device, quiet)
        }
        // Plain CLIP models have no routers, so `--routing` changes nothing for them.
        Command::Embed { model, images, out, routing, batch_size, weights } => {
            let batching = routing.batching(batch_size);
            let (model, images) = (names.model(model)?, names.data(images)?);
            names.say(quiet);
            embed::run(&embed::Args { model, images, out, batching, weights }, device, quiet)
        }
        Command::Eval { inputs, routing, batch_size, json, weights } => {
            let ((model, tasks), heads) = (inputs.located(&mut names)?, inputs.heads);
            names.say(quiet);
            let batching = routing.batching(batch_size);
            eval::run(&eval::Args { model, heads, tasks, batching, json, weights }, device, quiet)
        }
        Command::Heads { clip, tokenizer, tasks, templates, out } => {
            let clip = names.model(clip)?;
            let tokenizer = tokenizer.map(|t| names.model(t)).transpose()?;
            let mut seen = std::collections::BTreeSet::new();
            let mut read = Vec::new();
            for given in &tasks {
                let (name, source) = given.split_once('=').unwrap_or((given, given));
                if name.is_empty() || source.is_empty() || name.chars().any(char::is_whitespace) {
                    bail!("--task '{given}': expected NAME or NAME=SOURCE");
                }
                if !seen.insert(name.to_string()) {
                    bail!("--task '{name}' is given twice");
                }
                read.push(heads::read_task(name, &names.data(PathBuf::from(source))?, given)?);
            }
            names.say(quiet);
            let args = heads::Args { clip, tokenizer, tasks: read, templates, out };
            heads::run(&args, cli.device, cli.precision, quiet)
        }
        Command::Demo {
            json,
            suite,
            work,
            steps,
            lr,
            schedule,
            routing,
            batch_size,
            router_layers,
            router_activation,
            curve_points,
        } => {
            let args = demo::Args {
                suite: suite.unwrap_or_else(Suite::bundled_path),
                json,
                work,
                steps,
                lr,
                schedule: schedule.into(),
                routing: routing.batching(batch_size).routing,
                batch_size,
                router_layers: router_layers as usize,
                router_activation: router_activation.into(),
                curve_points,
            };
            demo::run(&args, device, quiet)
        }
        Command::Doctor { arch } => doctor::run(arch.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_specs_split_at_the_first_equals_sign() {
        assert_eq!(parse_named("task", "mnist=data/a=b.safetensors").unwrap().1, PathBuf::from("data/a=b.safetensors"));
        assert!(parse_named("task", "mnist").is_err());
        assert!(parse_named("expert", "=x").is_err());
    }

    #[test]
    fn one_of_anything_is_singular() {
        assert_eq!([images(1), images(0), images(4)], ["1 image", "0 images", "4 images"]);
        assert_eq!([count(1, "class", "classes"), count(2, "class", "classes")], ["1 class", "2 classes"]);
    }

    #[test]
    fn rayon_num_threads_is_held_to_the_range_of_threads() {
        let env = |v: &str| Some(std::ffi::OsString::from(v));
        assert_eq!(thread_request(None, env("3")).unwrap(), Some((3, "RAYON_NUM_THREADS=3".to_string())));
        assert_eq!(thread_request(Some(2), env("3")).unwrap(), Some((2, "--threads 2".to_string())));
        for default in [None, env(""), env("0")] {
            assert_eq!(thread_request(None, default).unwrap(), None);
        }
        for refused in ["abc", "-2", "1.5", "100000"] {
            let err = thread_request(None, env(refused)).unwrap_err().to_string();
            let want = format!("RAYON_NUM_THREADS='{refused}': expected a thread count from 1 to 1024");
            assert_eq!(err, format!("{want} (0 or unset: every logical CPU)"));
        }
    }
}
