//! The bf16 block products on AVX-512 BF16 (`vdpbf16ps`), for CPUs without AMX that issue those dot products at
//! full rate (AMD Zen 4 and later: 32 products per instruction against 16 for an f32 FMA). The operands keep
//! the tiles' layout: a tile row of the right-hand side holds one input pair of 16 outputs, exactly one
//! `vdpbf16ps` operand, and the left-hand row's matching pair is broadcast as the other. A block of 32 × 32
//! outputs is computed eight rows at a time, their 8 × 32 accumulators in 16 registers for the whole reduction.

/// Whether the CPU has AVX-512 F, BW and BF16: the dot products, and what packing any bf16 operand needs.
pub(super) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU is AMD's (CPUID's vendor string "AuthenticAMD"), whose cores with AVX-512 BF16 (Zen 4 and
/// later) run `vdpbf16ps` at the rate of `vfmadd231ps`, twice the products (`examples/bf16_dot_probe.rs`).
pub(super) fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let words = [leaf0.ebx, leaf0.edx, leaf0.ecx];
        let vendor: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::{BLOCK, STEP, TILE_ROWS};

    /// Rows of a block computed together (16 accumulators, two right-hand vectors and a broadcast in registers).
    const PASS_ROWS: usize = 8;
    /// bf16 elements of one tile (16 rows of 32).
    const TILE: usize = TILE_ROWS * STEP;

    /// `PASS_ROWS` rows of a block against its 32 outputs over `steps` steps: `acc[r][h]` (outputs `16h..16h + 16`
    /// of row `r`) gains `a`'s rows (`a` points at the first one's row in its first tile, tiles `TILE` apart,
    /// rows 32 bf16 apart) times the two output tiles `b`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pass(a: *const u16, b: [*const u16; 2], steps: usize, acc: &mut [[__m512; 2]; PASS_ROWS]) {
        for s in 0..steps {
            let (a, b0, b1) = (a.add(s * TILE), b[0].add(s * TILE), b[1].add(s * TILE));
            for p in 0..TILE_ROWS {
                // Input pair p (inputs 2p, 2p + 1 of this step) of 16 outputs each.
                let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(p * STEP).cast()));
                let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * STEP).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair = a.add(r * STEP + 2 * p).cast::<i32>().read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                }
            }
        }
    }

    /// Checks the operands of a block: `steps` tiles each.
    fn check_operands(a: &[&[u16]; 2], b: &[&[u16]; 2], steps: usize) {
        assert!(a.iter().chain(b).all(|o| o.len() >= steps * TILE), "dot block: operands");
    }

    /// The AMX `multiply_block`'s contract on dot products: one block of 32 × 32 outputs, accumulators starting
    /// at `bias[0..32]`, `steps` steps over the two row tiles `a` and the two output tiles `b`, its first `rows`
    /// rows and `cols` columns stored at `y` (row stride `stride`). Rows past `rows` are not computed.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
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
        check_operands(&a, &b, steps);
        assert!(bias.len() >= BLOCK && rows <= BLOCK && cols <= BLOCK, "dot multiply_block: bias or extent");
        let start = [_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(16))];
        let masks = [column_mask(cols), column_mask(cols.saturating_sub(16))];
        for r0 in (0..rows).step_by(PASS_ROWS) {
            let mut acc = [start; PASS_ROWS];
            let first = a[r0 / TILE_ROWS].as_ptr().add((r0 % TILE_ROWS) * STEP);
            pass(first, b.map(<[u16]>::as_ptr), steps, &mut acc);
            for (r, acc) in acc.iter().enumerate().take(rows - r0) {
                let row = y.add((r0 + r) * stride);
                _mm512_mask_storeu_ps(row, masks[0], acc[0]);
                _mm512_mask_storeu_ps(row.add(16), masks[1], acc[1]);
            }
        }
    }

    /// The AMX `accumulate_block`'s contract on dot products: `c[0..32, 0..32] += a·b` (row stride `stride`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn accumulate_block(a: [&[u16]; 2], b: [&[u16]; 2], steps: usize, c: *mut f32, stride: usize) {
        check_operands(&a, &b, steps);
        for r0 in (0..BLOCK).step_by(PASS_ROWS) {
            let mut acc: [[__m512; 2]; PASS_ROWS] = std::array::from_fn(|r| {
                let row = c.add((r0 + r) * stride);
                [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))]
            });
            let first = a[r0 / TILE_ROWS].as_ptr().add((r0 % TILE_ROWS) * STEP);
            pass(first, b.map(<[u16]>::as_ptr), steps, &mut acc);
            for (r, acc) in acc.iter().enumerate() {
                let row = c.add((r0 + r) * stride);
                _mm512_storeu_ps(row, acc[0]);
                _mm512_storeu_ps(row.add(16), acc[1]);
            }
        }
    }

    /// The lanes of the first `cols` (at most 16) of 16 columns.
    fn column_mask(cols: usize) -> __mmask16 {
        ((1u32 << cols.min(16)) - 1) as __mmask16
    }
}
