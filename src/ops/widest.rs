//! Plain Rust loops compiled for the widest vector instructions the CPU has.
//!
//! The crate is built for baseline x86-64, so a loop the compiler vectorises runs on 4-lane SSE2 unless it is
//! compiled inside a function that enables more. [`widest`] runs a closure inside such a function, chosen at
//! run time by [`Kernel::detect`] (so `WEMOE_MAX_CPU_ISA` caps it too). Rust never fuses a multiply and an
//! add on its own, so the values are the same bits whichever copy runs; only the lane count changes.

use super::expert_linear::Kernel;

/// `f()`, compiled with AVX-512F or AVX2 and FMA enabled when the CPU (within `WEMOE_MAX_CPU_ISA`) has them.
/// `f` and what it calls must inline into it to gain: mark the helpers they call `#[inline(always)]`.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    match Kernel::detect() {
        // SAFETY: `detect` returns Avx512 only when the CPU has AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { avx512(f) },
        // SAFETY: `detect` returns Avx2 only when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { avx2(f) },
        Kernel::Portable => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
