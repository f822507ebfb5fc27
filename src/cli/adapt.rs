//! `wemoe-engine adapt`: test-time adaptation of a WEMoE model's routers on unlabeled task data.

use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use wemoe_engine::adapt::{adapt, AdaptOptions};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::{self, DeviceRequest};
use wemoe_engine::model::Heads;

pub struct Args {
    pub model: PathBuf,
    pub heads: PathBuf,
    pub tasks: Vec<(String, PathBuf)>,
    pub out: PathBuf,
    pub options: AdaptOptions,
    pub resume: bool,
}

pub fn run(args: &Args, device: DeviceRequest, quiet: bool) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for (name, _) in &args.tasks {
        if !seen.insert(name) {
            bail!("--task '{name}' is given twice");
        }
    }
    let dir = ModelDir::open(&args.model)?;
    let be = device::open(device, quiet)?;
    let heads = Heads::open(be.as_ref(), &args.heads)?;
    let preprocess = Preprocess::for_model(&dir.path, dir.config.image_size)?;
    let mut data = Vec::new();
    for (name, path) in &args.tasks {
        heads.head(name)?;
        data.push(Dataset::open(path, &preprocess, dir.config.image_size)?);
    }
    let target = if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let bar = ProgressBar::with_draw_target(Some(args.options.steps), target);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} steps, loss {msg}, {per_sec}, eta {eta}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix("adapt");
    let mut last = f64::NAN;
    adapt(be.as_ref(), &dir, &heads, &args.tasks, &data, &args.options, &args.out, args.resume, &mut |r| {
        bar.set_position(r.step);
        bar.set_message(format!("{:.4}", r.loss));
        last = r.loss;
    })?;
    bar.finish_and_clear();
    if !quiet {
        eprintln!("wrote {} ({} steps, last loss {last:.4})", args.out.display(), args.options.steps);
    }
    Ok(())
}
