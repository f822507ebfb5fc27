//! `wemoe-engine adapt`: test-time adaptation of a WEMoE model's routers on unlabeled task data.

use std::path::PathBuf;

use anyhow::Result;
use wemoe_engine::adapt::{adapt, check_checkpoint, check_out, AdaptOptions, CHECKPOINT};
use wemoe_engine::device::DeviceChoice;
use wemoe_engine::run_lock::RunLock;

use super::{count, open_task_inputs, progress, TaskInputs};

pub struct Args {
    pub model: PathBuf,
    pub heads: PathBuf,
    pub tasks: Vec<(String, PathBuf)>,
    pub out: PathBuf,
    pub options: AdaptOptions,
    pub resume: bool,
}

pub fn run(args: &Args, device: DeviceChoice, quiet: bool) -> Result<()> {
    // Before the device opens, so that a refusal is the one line.
    args.options.check()?;
    check_out(&args.out, &args.model)?;
    RunLock::check_free("--out", &args.out)?;
    check_checkpoint(&args.out, args.resume, &args.model, &args.heads, &args.tasks, &args.options)?;
    let TaskInputs { dir, be, heads, tasks } = open_task_inputs(&args.model, &args.heads, &args.tasks, device, quiet)?;
    let (names, mut data): (Vec<(String, PathBuf)>, Vec<_>) = tasks.into_iter().map(|(n, p, d)| ((n, p), d)).unzip();
    // Shuffled batches: a parquet dataset's images in memory rather than a file reopened per image.
    for d in &mut data {
        d.hold_in_memory()?;
    }
    let checkpoint = args.out.join(CHECKPOINT);
    let tasks = names.iter().map(|(n, _)| n.as_str()).zip(data.iter().map(|d| d.len()));
    let mut notes =
        super::run_notes(tasks, args.options.batch_size, args.resume.then_some(&*checkpoint), be.precision(), quiet);
    let alike = dir.wemoe.as_ref().is_some_and(|w| w.router_activation.routes_every_input_alike(w.experts.len()));
    if alike && !quiet {
        notes.push(format!("the model's {}", super::merge::ROUTES_ALIKE));
    }
    let bar = progress::steps("adapt", args.options.steps, quiet);
    let mut last = None;
    adapt(be.as_ref(), &dir, &heads, &names, &data, &args.options, &args.out, args.resume, &mut |r| {
        super::say_notes(&bar, &mut notes);
        bar.set_position(r.step);
        bar.set_message(format!("{:.4}", r.loss));
        last = Some(r.loss);
    })?;
    bar.finish_and_clear();
    if !quiet {
        let steps = count(args.options.steps as usize, "step", "steps");
        eprintln!("wrote {} ({steps}, {})", args.out.display(), progress::last_loss(last));
    }
    Ok(())
}
