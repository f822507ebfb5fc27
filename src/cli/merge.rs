//! `wemoe-engine merge`: WEMoE, task arithmetic, TIES-merging, averaging or AdaMerging of fine-tuned CLIP
//! models.

use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::data::Dataset;
use wemoe_engine::device::DeviceChoice;
use wemoe_engine::merge::{
    adamerging, check_adamerging_checkpoint, check_adamerging_out, merge, AdaMergingOptions, Expert, Granularity,
    MergeOptions, ADAMERGING_CHECKPOINT, COEFFICIENTS_FILE,
};
use wemoe_engine::run_lock::RunLock;

use super::{count, open_task_inputs, progress, TaskInputs};

/// What to do with the models.
pub enum Job {
    /// A merge from the weights alone.
    DataFree(MergeOptions),
    /// Layer-wise AdaMerging on unlabeled task data.
    AdaMerging {
        heads: PathBuf,
        tasks: Vec<(String, PathBuf)>,
        options: AdaMergingOptions,
        device: DeviceChoice,
        resume: bool,
    },
}

pub struct Args {
    pub pretrained: PathBuf,
    pub experts: Vec<(String, PathBuf)>,
    pub out: PathBuf,
    pub job: Job,
}

pub fn run(args: &Args, quiet: bool) -> Result<()> {
    let open_experts = || {
        args.experts
            .iter()
            .map(|(name, path)| Ok(Expert { name: name.clone(), model: ModelDir::open(path)? }))
            .collect::<Result<Vec<_>>>()
    };
    let options = match &args.job {
        Job::DataFree(options) => options,
        Job::AdaMerging { heads, tasks, options, device, resume } => {
            // The settings, the output folder, the experts, then the pretrained model, the heads and the tasks'
            // data as adapt and eval open them: every refusal before the device opens.
            options.check()?;
            RunLock::check_free("--out", &args.out)?;
            check_adamerging_out(&args.out, *resume)?;
            let experts = open_experts()?;
            check_adamerging_checkpoint(&args.out, &args.pretrained, &experts, heads, tasks, options)?;
            let inputs = open_task_inputs(&args.pretrained, heads, tasks, *device, quiet)?;
            return run_adamerging(inputs, &experts, options, *resume, &args.out, quiet);
        }
    };
    let pretrained = ModelDir::open(&args.pretrained)?;
    let experts = open_experts()?;
    let bar = ProgressBar::with_draw_target(None, progress::target(quiet));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} tensors, eta {eta}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix("merge");
    let summary = merge(&pretrained, &experts, options, &args.out, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if let (Some(stats), false) = (&summary.ties, quiet) {
        let thresholds: Vec<String> =
            experts.iter().zip(&stats.thresholds).map(|(e, t)| format!("{} {t:.4e}", e.name)).collect();
        let majority = match stats.majority_sign {
            s if s > 0.0 => "+",
            s if s < 0.0 => "-",
            _ => "0 (a tie, so those parameters kept their negative entries)",
        };
        eprintln!(
            "ties-merging kept the top {}% of each task vector by magnitude (at least {}); where the kept entries \
             summed to 0, the majority sign {majority} stood in",
            100.0 * stats.keep,
            thresholds.join(", "),
        );
    }
    if !quiet {
        eprintln!(
            "wrote {} ({} tensors, {} parameters, {})",
            args.out.display(),
            summary.tensors,
            summary.parameters,
            count(experts.len(), "expert", "experts")
        );
    }
    Ok(())
}

/// The note on softmax routers over one expert (`merge` makes them, `adapt` meets them): allowed, as FusionBench
/// allows them, but a run that can change nothing should say so.
pub const ROUTES_ALIKE: &str = "softmax routers over one expert give it weight 1 whatever the input: the routers have \
     no effect, and adapt has nothing to learn (identity routers scale the expert's task vector per input)";

/// Notes on experts that are the pretrained model itself, or the same model as an earlier expert (one folder
/// named twice, or through a link or a Hub name: a slip in a long command), whose task vectors are then zero or
/// equal. They are merged all the same, as FusionBench would merge them.
pub fn repeated_models(pretrained: &Path, experts: &[(String, PathBuf)]) -> Vec<String> {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let pretrained_real = real(pretrained);
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    let mut notes = Vec::new();
    for (name, path) in experts {
        let path_real = real(path);
        if path_real == pretrained_real {
            notes
                .push(format!("expert '{name}' is the pretrained model ({}): its task vector is zero", path.display()));
        } else if let Some((first, _)) = seen.iter().find(|(_, p)| *p == path_real) {
            notes.push(format!(
                "experts '{first}' and '{name}' are the same model ({}): their task vectors are equal",
                path.display()
            ));
        }
        seen.push((name, path_real));
    }
    notes
}

/// AdaMerging: the coefficients trained with a progress bar, the model written.
fn run_adamerging(
    inputs: TaskInputs,
    experts: &[Expert],
    options: &AdaMergingOptions,
    resume: bool,
    out: &Path,
    quiet: bool,
) -> Result<()> {
    let TaskInputs { dir: pretrained, be, heads, tasks } = inputs;
    let (names, mut data): (Vec<String>, Vec<Dataset>) = tasks.into_iter().map(|(n, _, d)| (n, d)).unzip();
    // Shuffled batches: a parquet dataset's images in memory rather than a file reopened per image.
    for d in &mut data {
        d.hold_in_memory()?;
    }
    let checkpoint = out.join(ADAMERGING_CHECKPOINT);
    let tasks = names.iter().map(String::as_str).zip(data.iter().map(|d| d.len()));
    let mut notes = super::run_notes(tasks, options.batch_size, resume.then_some(&*checkpoint), be.precision(), quiet);
    let bar = progress::steps("adamerging", options.steps, quiet);
    let mut last = None;
    let summary =
        adamerging(be.as_ref(), &pretrained, experts, &heads, &names, &data, options, out, resume, &mut |s| {
            super::say_notes(&bar, &mut notes);
            bar.set_position(s.step);
            bar.set_message(format!("{:.4}", s.loss));
            last = Some(s.loss);
        })?;
    bar.finish_and_clear();
    if !quiet {
        let all: Vec<f32> = summary.coefficients.values.values().flatten().copied().collect();
        let (lo, hi) = all.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let mean = all.iter().map(|&v| v as f64).sum::<f64>() / all.len().max(1) as f64;
        let shape = match options.granularity {
            Granularity::LayerWise => {
                format!("{} × {} tensors", count(experts.len(), "expert", "experts"), summary.coefficients.names.len())
            }
            Granularity::TaskWise => format!("{}, task-wise", count(experts.len(), "expert", "experts")),
        };
        eprintln!(
            "adamerging trained {} coefficients ({shape}) in {} ({}), coefficients {lo:.4} to \
             {hi:.4}, mean {mean:.4} (in {COEFFICIENTS_FILE})",
            all.len(),
            count(options.steps as usize, "step", "steps"),
            progress::last_loss(last),
        );
        eprintln!(
            "wrote {} ({} tensors, {} parameters, {})",
            out.display(),
            summary.tensors,
            summary.parameters,
            count(experts.len(), "expert", "experts")
        );
    }
    Ok(())
}
