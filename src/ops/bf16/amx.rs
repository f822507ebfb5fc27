//! The bf16 block products on AMX tiles (Intel Sapphire Rapids and later): a block of 32 × 32 outputs lives in
//! four accumulator tiles for the whole reduction; each step of 32 inputs loads two tiles of the left operand
//! (16 rows × 32 inputs) and two of the right (16 pairs of inputs × 16 outputs, the pairs interleaved as
//! `tdpbf16ps` takes them) and issues four `tdpbf16ps`. Callers hold a [`super::TileSession`], which configured
//! the tiles on their thread.

#[cfg(target_arch = "x86_64")]
pub(super) use x86::*;

/// Whether this CPU has AMX bf16 tiles and the OS granted this process their state (checked once:
/// CPUID, then the Linux permission to use the tile data state, which the kernel grants per process).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) fn granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7 (present wherever AVX-512 is): EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the packing needs
        // AVX-512 BF16 and BW.
        let leaf7 = std::is_x86_feature_detected!("avx512f").then(|| std::arch::x86_64::__cpuid_count(7, 0));
        let amx = leaf7.is_some_and(|l| l.edx & (1 << 22) != 0 && l.edx & (1 << 24) != 0);
        if !(amx && super::dot::supported()) {
            return false;
        }
        unsafe extern "C" {
            fn syscall(number: std::ffi::c_long, ...) -> std::ffi::c_long;
        }
        const SYS_ARCH_PRCTL: std::ffi::c_long = 158;
        const ARCH_REQ_XCOMP_PERM: std::ffi::c_long = 0x1023;
        const XFEATURE_XTILEDATA: std::ffi::c_long = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only asks the kernel for permission; it fails cleanly where
        // the kernel (before 5.16) or the hypervisor does not offer the state.
        unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    })
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) fn granted() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    use super::super::{BLOCK, STEP, TILE_ROWS};

    /// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// Loads the tile configuration on this thread (it is per thread, and zeroes the tiles).
    pub unsafe fn configure_tiles() {
        let mut config =
            TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        config.bytes_per_row[..8].fill(64);
        config.rows[..8].fill(TILE_ROWS as u8);
        asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
    }

    /// Returns the tile state to its initial state, so context switches no longer save it.
    pub unsafe fn release_tiles() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// One block of 32 × 32 outputs: accumulators start at `bias[0..32]` (a tile loaded with row stride 0),
    /// then `steps` steps of 32 inputs over the two row tiles `a` and the two output tiles `b`, then the block is
    /// stored at `y` (row stride `stride`), its first `rows` rows and `cols` columns (through a scratch block
    /// where that is not all of it).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn multiply_block(
        a: [&[u16]; 2],
        b: [&[u16]; 2],
        steps: usize,
        bias: &[f32],
        y: *mut f32,
        stride: usize,
        rows: usize,
        cols: usize,
    ) {
        const TILE: usize = TILE_ROWS * STEP; // bf16 elements of one tile
        assert!(a.iter().chain(&b).all(|o| o.len() >= steps * TILE) && bias.len() >= BLOCK, "multiply_block: operands");
        let ([a0, a1], [b0, b1]) = (a.map(<[u16]>::as_ptr), b.map(<[u16]>::as_ptr));
        let bias = bias.as_ptr();
        asm!(
            "tileloadd tmm0, [{bias} + {zero}*1]",
            "tileloadd tmm1, [{bias1} + {zero}*1]",
            "tileloadd tmm2, [{bias} + {zero}*1]",
            "tileloadd tmm3, [{bias1} + {zero}*1]",
            bias = in(reg) bias, bias1 = in(reg) bias.add(16), zero = in(reg) 0usize,
            options(nostack, readonly),
        );
        run_steps([a0, a1], [b0, b1], steps);
        let full = rows == BLOCK && cols == BLOCK;
        let mut scratch = std::mem::MaybeUninit::<[f32; BLOCK * BLOCK]>::uninit();
        let (c, c_stride) = if full { (y, stride) } else { (scratch.as_mut_ptr().cast::<f32>(), BLOCK) };
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * c_stride),
            c3 = in(reg) c.add(16 * c_stride + 16),
            s = in(reg) c_stride * 4,
            options(nostack),
        );
        if !full {
            let scratch = scratch.as_ptr().cast::<f32>(); // written whole by the stores above
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(scratch.add(r * BLOCK), y.add(r * stride), cols);
            }
        }
    }

    /// `steps` steps of 32 inputs into the accumulators tmm0..tmm3 (tiles of `a` and `b` consecutive from
    /// their starts, 1 KiB each).
    #[inline(always)]
    unsafe fn run_steps(a: [*const u16; 2], b: [*const u16; 2], steps: usize) {
        const TILE: usize = TILE_ROWS * STEP; // bf16 elements of one tile
        let ([a0, a1], [b0, b1]) = (a, b);
        for s in 0..steps {
            asm!(
                "tileloadd tmm4, [{a0} + {stride}*1]",
                "tileloadd tmm6, [{b0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(s * TILE),
                a1 = in(reg) a1.add(s * TILE),
                b0 = in(reg) b0.add(s * TILE),
                b1 = in(reg) b1.add(s * TILE),
                stride = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }

    /// `c[0..32, 0..32] += a·b` over `steps` steps (row stride `stride` floats): the accumulators loaded from
    /// `c` and stored back.
    pub unsafe fn accumulate_block(a: [&[u16]; 2], b: [&[u16]; 2], steps: usize, c: *mut f32, stride: usize) {
        let tiles = [c, c.add(16), c.add(16 * stride), c.add(16 * stride + 16)];
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c0 = in(reg) tiles[0], c1 = in(reg) tiles[1], c2 = in(reg) tiles[2], c3 = in(reg) tiles[3],
            s = in(reg) stride * 4,
            options(nostack, readonly),
        );
        run_steps(a.map(<[u16]>::as_ptr), b.map(<[u16]>::as_ptr), steps);
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) tiles[0], c1 = in(reg) tiles[1], c2 = in(reg) tiles[2], c3 = in(reg) tiles[3],
            s = in(reg) stride * 4,
            options(nostack),
        );
    }
}
