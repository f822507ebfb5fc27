//! The CUDA sources of `kernels/*.cu`, embedded at build time by `build.rs` with a content hash
//! (the key, with the architecture and the NVRTC version, of the compiled-module cache).

/// One embedded kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File stem, e.g. `router` for `kernels/router.cu`.
    pub name: &'static str,
    /// The CUDA C++ text.
    pub source: &'static str,
    /// FNV-1a 64 of the text.
    pub hash: u64,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
