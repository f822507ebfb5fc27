//! The CUDA sources of `kernels/`, embedded at build time by `build.rs` with a content hash (with the
//! architecture and the NVRTC version, the key of the compiled-module cache), and the signature of every
//! kernel function, against which each launch's arguments are checked on the GPU and in the emulation.

/// One embedded file: a kernel source (`.cu`) or a shared header (`.cuh`).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File stem, e.g. `router` for `kernels/router.cu`.
    pub name: &'static str,
    /// File name, e.g. `router.cu`: what `#include` names for headers.
    pub file: &'static str,
    /// A header, included by sources rather than compiled on its own.
    pub header: bool,
    /// The CUDA C++ text.
    pub source: &'static str,
    /// FNV-1a 64 of the text.
    pub hash: u64,
    /// The oldest architecture it compiles for (80 for sm_80; 0: any NVRTC offers), from its
    /// `// needs sm_XY: WHAT` line.
    pub min_arch: u32,
    /// What sets `min_arch` (the line's WHAT; empty where it is 0).
    pub needs: &'static str,
}

impl KernelSource {
    /// Why it cannot be compiled for `arch` (e.g. `sm_75`), if it cannot: the architecture it needs and why.
    pub fn unsupported_on(&self, arch: &str) -> Option<String> {
        let number = arch_number(arch)?;
        (number < self.min_arch)
            .then(|| format!("{} needs sm_{} or later ({}), not {arch}", self.file, self.min_arch, self.needs))
    }
}

/// The number of an architecture name: 90 for `sm_90` or `sm_90a`, 100 for `sm_100`; `None` if it is not one.
pub fn arch_number(arch: &str) -> Option<u32> {
    let digits = arch.strip_prefix("sm_")?;
    digits.strip_suffix('a').unwrap_or(digits).parse().ok()
}

/// The C type of a kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `const float*`: an input buffer (or null where the kernel allows).
    ConstF32Ptr,
    /// `float*`: an output buffer (or null where the kernel allows).
    F32Ptr,
    /// `int`.
    I32,
    /// `float`.
    F32,
    /// `double`.
    F64,
}

/// One `extern "C" __global__` function.
#[derive(Debug, Clone, Copy)]
pub struct KernelFunction {
    /// The stem of the source that defines it.
    pub source: &'static str,
    /// Its name.
    pub name: &'static str,
    /// Its parameters' types, in order.
    pub params: &'static [ParamKind],
    /// Its parameters' names, in order (for error messages).
    pub param_names: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The kernel sources (headers left out).
pub fn sources() -> impl Iterator<Item = &'static KernelSource> {
    KERNELS.iter().filter(|k| !k.header)
}

/// The shared headers.
pub fn headers() -> impl Iterator<Item = &'static KernelSource> {
    KERNELS.iter().filter(|k| k.header)
}

/// The kernel source called `name` (its file stem).
pub fn source(name: &str) -> Option<&'static KernelSource> {
    sources().find(|s| s.name == name)
}

/// The kernel function called `name`.
pub fn function(name: &str) -> Option<&'static KernelFunction> {
    KERNEL_FUNCTIONS.iter().find(|f| f.name == name)
}

/// The cache key of a source: its hash combined with every header's (any of them may be included).
pub fn source_key(source: &KernelSource) -> u64 {
    headers().fold(source.hash, |h, header| (h ^ header.hash).wrapping_mul(0x100_0000_01b3).rotate_left(17))
}
