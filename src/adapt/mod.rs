//! Test-time adaptation of the routers: Adam on the summed entropy of unlabeled test batches.

mod adam;
mod routers;
mod run;
mod sampler;

pub use adam::Adam;
pub use routers::RouterParams;
pub use run::{
    adapt, check_checkpoint, check_out, run_checkpoint, AdaptOptions, CheckpointSummary, Schedule, StepReport,
    CHECKPOINT,
};
pub(crate) use run::{check_resumable, finite, finite_after_update, model_not_written, recorded_path, CheckpointState};
pub(crate) use sampler::check_restored;
pub use sampler::TaskSampler;
