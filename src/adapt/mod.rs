//! Test-time adaptation of the routers: Adam on the summed entropy of unlabeled test batches.

mod adam;
mod routers;

pub use adam::Adam;
pub use routers::RouterParams;
