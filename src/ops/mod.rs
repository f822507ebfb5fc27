//! CPU reference implementations of every operation, on plain slices.
//!
//! Each file holds one operation, its forward and, where adaptation needs it, its backward. These functions
//! are the CPU backend and the oracle that every other implementation (a GPU kernel, its host emulation) is
//! tested against; each backward is proven against finite differences of an independent f64 forward.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod entropy;
pub mod expert_linear;
pub mod gemm;
#[cfg(test)]
pub mod gradcheck;
pub mod layer_norm;
pub mod patch_embed;
pub mod router;
pub mod rows;
pub mod task_vectors;
pub mod transpose;
mod widest;
