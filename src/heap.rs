//! The process's heap policy: freed memory stays in the heap for reuse.
//!
//! glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and
//! unmaps it when freed, so each forward pass faulted in and zeroed its largest activations again: a profile of
//! a 64-image per-sample `embed` of a ViT-B/32 WEMoE model put 13% of its samples in the kernel clearing pages
//! (2% with batch routing). Serving them from the heap and keeping what is freed there makes the next layer
//! reuse the same pages (BENCHMARKS.md: 10.4 → 11.7 images/s per sample, 13.7 → 15.1 batch, peak memory
//! +1.3%). The library never calls this: the command line does as it starts, and so do the probes that time
//! products as the command line runs them (`examples/gemm_probe.rs`).

/// Raises glibc's mmap and trim thresholds to 1 GiB (no-op off glibc). Call it first in `main`, before any
/// other thread starts, as the command line does.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // From glibc's malloc.h.
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        const ONE_GIB: std::ffi::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; callers call it before other threads start. A refusal
        // (return 0) leaves glibc's defaults, which are correct, only slower.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, ONE_GIB);
            mallopt(M_TRIM_THRESHOLD, ONE_GIB);
        }
    }
}
