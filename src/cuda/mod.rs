//! The CUDA side: NVRTC compilation of `kernels/*.cu` to CUBINs (cached), the executors that run kernels
//! (a GPU through cudarc's driver API, or the host emulation of the same sources), and one launch wrapper
//! per kernel. Nothing here panics when there is no GPU, driver or NVRTC: every first touch of a CUDA
//! library goes through [`library`], which turns absence into an error.

pub mod gpu;
pub mod host;
pub mod launch;
pub mod library;
pub mod nvrtc;
pub mod ops;

pub use gpu::GpuExecutor;
pub use host::{with_copy_landing, CopyLanding, HostBuffer, HostExecutor};
pub use launch::{Arg, Dims, Executor};
