//! Reverse-mode automatic differentiation for test-time adaptation: a tape of backward steps recorded by
//! the forward (dfdx's design), gradients kept only for the parameters that train: the WEMoE routers, or
//! for AdaMerging every parameter of a plain model.

mod ops;
mod tape;
mod vit;

pub use ops::Tracked;
pub use tape::{Gradients, Tape, Var};
pub use vit::{entropy_loss_and_gradients, entropy_loss_and_router_gradients, TaskBatch, Trainable};
