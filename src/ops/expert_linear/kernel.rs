//! Which of the WEMoE kernel sets runs: AVX-512, AVX2 with FMA, or plain Rust, chosen once at run time from
//! what the CPU has, within `WEMOE_MAX_CPU_ISA`.

/// The instruction set of the WEMoE kernels (merge, micro-kernel, router-gradient contraction), both routings.
/// Ordered by width: a cap keeps the narrower of itself and what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kernel {
    /// Plain Rust for the merges and the `gemm` crate on each tile (any CPU).
    Portable,
    /// The AVX-512 algorithms on 8 lanes (x86-64 with AVX2 and FMA: AMD Zen 2 and 3, Intel client cores).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// 16-lane kernels (x86-64 with AVX-512F).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Caps the kernels' instruction set below what the CPU offers (`avx2` or `portable`), to reproduce on
/// one machine what another runs, as oneDNN's `ONEDNN_MAX_CPU_ISA` does.
pub const MAX_ISA_ENV: &str = "WEMOE_MAX_CPU_ISA";

impl Kernel {
    /// The widest this CPU runs, within [`MAX_ISA_ENV`] (read once).
    pub(crate) fn detect() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let cap = std::env::var(MAX_ISA_ENV).ok();
            let widest = Kernel::widest();
            match cap.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("") | Some("avx512") => widest,
                #[cfg(target_arch = "x86_64")]
                Some("avx2") => widest.min(Kernel::Avx2),
                #[cfg(not(target_arch = "x86_64"))]
                Some("avx2") => widest,
                Some("portable") => Kernel::Portable,
                Some(other) => {
                    eprintln!("warning: {MAX_ISA_ENV}={other} ignored (expected avx512, avx2 or portable)");
                    widest
                }
            }
        })
    }

    fn widest() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel set this CPU can run (for tests that compare them): those up to the widest.
    #[cfg(test)]
    pub(super) fn all_available() -> Vec<Self> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend([Kernel::Avx2, Kernel::Avx512]);
        all.retain(|&k| k <= Kernel::widest());
        all
    }

    /// Chunks of 32 inputs per merged tile. The SIMD kernels: two, whose products their micro-kernels keep in
    /// registers across both, so each run of rows reads and writes its outputs half as often. At B/32 that took
    /// 2–3% off each routing's MLP (medians of alternating pairs): on AVX-512 batch routing's from 141.5 to 137.4
    /// ms a layer and per-sample routing's from 173.7 to 168.5, though eight groups' tiles of 64 inputs no
    /// longer fit L1 together; on AVX2 (`WEMOE_MAX_CPU_ISA=avx2`, same machine) from 156.8 to 153.0 and from
    /// 193.6 to 189.7. Three or four chunks were no better, nor were passes of four groups (BENCHMARKS.md). The
    /// portable path: one (its products are the `gemm` crate's, chunk by chunk).
    pub(super) fn tile_chunks(self) -> usize {
        match self {
            Kernel::Portable => 1,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx512 => 2,
        }
    }

    /// The name `describe` and `doctor` print.
    pub(crate) fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "AVX-512",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "AVX2",
            Kernel::Portable => "portable",
        }
    }
}
