//! `wemoe-engine merge`: WEMoE, task arithmetic, TIES-merging or averaging of fine-tuned CLIP models.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::merge::{merge, Expert, MergeOptions};

pub struct Args {
    pub pretrained: PathBuf,
    pub experts: Vec<(String, PathBuf)>,
    pub out: PathBuf,
    pub options: MergeOptions,
}

pub fn run(args: &Args, quiet: bool) -> Result<()> {
    let pretrained = ModelDir::open(&args.pretrained)?;
    let experts = args
        .experts
        .iter()
        .map(|(name, path)| Ok(Expert { name: name.clone(), model: ModelDir::open(path)? }))
        .collect::<Result<Vec<_>>>()?;
    let target = if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} tensors, eta {eta}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix("merge");
    let summary = merge(&pretrained, &experts, &args.options, &args.out, &mut |done, total| {
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
            "wrote {} ({} tensors, {} parameters, {} experts)",
            args.out.display(),
            summary.tensors,
            summary.parameters,
            experts.len()
        );
    }
    Ok(())
}
