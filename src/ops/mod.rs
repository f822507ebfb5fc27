//! CPU reference implementations of every operation, on plain slices.
//!
//! Each file holds one operation. These functions are the CPU backend and the oracle that every
//! other implementation (a GPU kernel, its host emulation) is tested against.

pub mod activation;
pub mod attention;
pub mod expert_linear;
pub mod gemm;
pub mod layer_norm;
pub mod patch_embed;
pub mod router;
pub mod rows;
pub mod transpose;
