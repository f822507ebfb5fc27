//! Matrix products with bf16 operands and f32 accumulation: `--precision bf16` on the CPU. Each operand is
//! rounded to bf16 (to nearest even) once, into the order the tiles load it, and every product of two bf16
//! values is exact in f32, so the result is the f32 sum of the rounded operands' products: what the tests
//! check, and what the GPU's bf16 path computes.
//!
//! The operands are laid out as AMX tiles (16 rows × 64 bytes) and multiplied in blocks of 32 × 32 outputs by
//! one of two units, chosen once per process ([`Bf16Unit`]): AMX tiles (`amx`, Intel Sapphire Rapids and
//! later) or AVX-512 BF16 dot products (`dot`) on CPUs that issue them at twice the rate of f32's fused
//! multiply-adds (AMD Zen 4 and later). The same layout serves both: a tile row of the right-hand side is
//! 16 outputs' input pairs, one `vdpbf16ps` operand, and a left-hand row's pair broadcasts to the other.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::gemm::MatRef;

mod amx;
mod dot;

/// The unit that multiplies bf16 blocks on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Unit {
    /// AMX tiles: `tdpbf16ps`, 16 × 16 outputs × 32 inputs per instruction.
    AmxTiles,
    /// AVX-512 BF16: `vdpbf16ps`, 16 outputs × 2 inputs per instruction, where it runs at full rate.
    Avx512Dot,
}

impl std::fmt::Display for Bf16Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bf16Unit::AmxTiles => "AMX",
            Bf16Unit::Avx512Dot => "AVX-512 BF16",
        })
    }
}

/// The unit this CPU and OS multiply bf16 blocks on, if any (checked once: CPUID, then for AMX the Linux
/// permission to use the tile data state, which the kernel grants per process).
pub fn unit() -> Option<Bf16Unit> {
    static UNIT: OnceLock<Option<Bf16Unit>> = OnceLock::new();
    *UNIT.get_or_init(detect)
}

/// Whether `--precision bf16` can run on this CPU: [`unit()`] found one.
pub fn available() -> bool {
    unit().is_some()
}

/// Whether this CPU has what packing operands needs (AVX-512 BF16 and BW): wherever a [`Bf16Unit`] is, and on
/// Intel CPUs that have AVX-512 BF16 without AMX, where the tests still run the dot-product unit.
fn can_pack() -> bool {
    dot::supported()
}

/// Why [`available`] is false, in the words of an error message's end ("needs ..., which this CPU lacks").
pub fn unavailable_reason() -> String {
    const NEEDS: &str = "AMX tiles (Intel Sapphire Rapids or later) or AVX-512 BF16 at full rate (AMD Zen 4 or later)";
    if dot::supported() && !dot::amd() {
        format!("{NEEDS}; this CPU has AVX-512 BF16, whose dot products run at half f32's speed or less on Intel cores")
    } else {
        format!("{NEEDS}, which this CPU lacks")
    }
}

fn detect() -> Option<Bf16Unit> {
    if amx::granted() {
        Some(Bf16Unit::AmxTiles)
    } else if dot::supported() && dot::amd() {
        // On Intel cores without AMX (Sapphire and Emerald Rapids whose hypervisor hides the tiles) `vdpbf16ps`
        // issues at a quarter of the FMAs' rate: bf16 would run at half f32's speed (BENCHMARKS.md,
        // examples/bf16_dot_probe.rs). On AMD Zen 4 it runs at twice their products per second.
        Some(Bf16Unit::Avx512Dot)
    } else {
        None
    }
}

/// Rows of a tile (each 64 bytes: 32 bf16 or 16 f32).
const TILE_ROWS: usize = 16;
/// Inputs per step: a tile row of bf16.
const STEP: usize = 32;
/// Outputs and rows per block (two tiles each way).
const BLOCK: usize = 32;

/// A right-hand side `[k, n]` rounded to bf16 in `tdpbf16ps` order: panels of 16 outputs, each
/// `[k/2][16][2]` (inputs 2i and 2i+1 of an output side by side), inputs and outputs zero-padded to
/// multiples of 32.
pub struct PackedRhs {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    fn padded_k(&self) -> usize {
        self.k.next_multiple_of(STEP)
    }

    /// A right-hand side `[k, n]` whose panels were written elsewhere (a merge writing them directly), in
    /// [`pack_rhs`]'s layout: [`rhs_panel_len`]`(k)` elements per panel of 16 outputs, `n` padded to 32.
    pub(crate) fn from_panels(data: Vec<u16>, k: usize, n: usize) -> Self {
        assert_eq!(data.len(), rhs_panel_len(k) * n.div_ceil(BLOCK) * 2, "PackedRhs::from_panels: {k}×{n}");
        PackedRhs { data, k, n }
    }

    /// Outputs `32b..32b + 32` (two panels of 16), as [`multiply_panel`] takes them.
    pub(crate) fn block_panel(&self, b: usize) -> &[u16] {
        let len = panel_len(self.k);
        &self.data[b * len..(b + 1) * len]
    }
}

/// Bf16 elements of one panel of 16 outputs of a packed right-hand side with `k` inputs.
pub(crate) fn rhs_panel_len(k: usize) -> usize {
    k.next_multiple_of(STEP) * TILE_ROWS
}

/// Packs `w` `[k, n]` (row-major f32, the CPU backend's `[in, out]`) for [`linear`].
pub fn pack_rhs(w: &[f32], k: usize, n: usize) -> Result<PackedRhs> {
    ensure!(w.len() == k * n, "pack_rhs: {} elements for {k}×{n}", w.len());
    pack_rhs_view(MatRef::row_major(w, k, n)?)
}

/// Packs the `[k, n]` view `w` for [`linear`]: a transposed view packs `Wᵀ` for a backward product.
pub fn pack_rhs_view(w: MatRef) -> Result<PackedRhs> {
    ensure!(can_pack(), "bf16 products need {}", unavailable_reason());
    let (k, n) = (w.rows(), w.cols());
    let (kp, np) = (k.next_multiple_of(STEP), n.next_multiple_of(BLOCK));
    let mut data = vec![0u16; kp * np];
    data.par_chunks_mut(kp * TILE_ROWS).enumerate().for_each(|(p, panel)| pack_rhs_panel(w, p, panel));
    Ok(PackedRhs { data, k, n })
}

/// Packs a small `[k, n]` right-hand side (a block of a gradient) into `out` on this thread, in [`pack_rhs`]'s
/// layout: `rhs_panel_len(k)` elements per panel of 16 outputs, `n` padded to 32.
pub(crate) fn pack_rhs_into(w: &[f32], k: usize, n: usize, out: &mut [u16]) {
    assert!(can_pack() && w.len() == k * n, "pack_rhs_into: AVX-512 BF16 and [{k}, {n}]");
    let view = MatRef::row_major(w, k, n).expect("length checked");
    let len = rhs_panel_len(k);
    assert_eq!(out.len(), len * n.next_multiple_of(BLOCK) / TILE_ROWS, "pack_rhs_into: output");
    out.chunks_exact_mut(len).enumerate().for_each(|(p, panel)| pack_rhs_panel(view, p, panel));
}

/// Panel `p` (outputs `16p..16p + 16`) of [`pack_rhs_view`]; outputs and inputs past the view's are zeros.
fn pack_rhs_panel(w: MatRef, p: usize, panel: &mut [u16]) {
    let (k, n) = (w.rows(), w.cols());
    let cols = p * TILE_ROWS..((p + 1) * TILE_ROWS).min(n);
    if cols.is_empty() {
        panel.fill(0);
        return;
    }
    let mut pair = [[0.0f32; TILE_ROWS]; 2];
    for (i, out) in panel.chunks_exact_mut(2 * TILE_ROWS).enumerate() {
        for (r, row) in pair.iter_mut().enumerate() {
            let kk = 2 * i + r;
            row.fill(0.0);
            if kk < k {
                w.copy_row_into(kk, cols.clone(), &mut row[..cols.len()]);
            }
        }
        // SAFETY: every caller checked `can_pack()`: AVX-512 BF16 and BW.
        unsafe { kernels::interleave_pair(&pair[0], &pair[1], out) };
    }
}

/// Rows `[m, k]` (a product's left-hand side) rounded to bf16 in tile order: `[m/16][k/32][16][32]`, `m`
/// and `k` zero-padded to multiples of 32.
pub(crate) fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<u16> {
    assert!(x.len() == m * k, "pack_rows: [{m}, {k}] rows");
    pack_rows_view(MatRef::row_major(x, m, k).expect("length checked"))
}

/// [`pack_rows`] of a view: a transposed one packs `xᵀ`, its 16 rows of a tile read from the same 32 lines.
pub(crate) fn pack_rows_view(x: MatRef) -> Vec<u16> {
    let (m, k) = (x.rows(), x.cols());
    assert!(can_pack(), "pack_rows: AVX-512 BF16");
    let (mp, kp) = (m.next_multiple_of(BLOCK), k.next_multiple_of(STEP));
    // Not zeroed first: every element is written below, padding included.
    let mut data = Vec::<u16>::with_capacity(mp * kp);
    data.spare_capacity_mut()[..mp * kp]
        .par_chunks_mut(TILE_ROWS * kp)
        .enumerate()
        .for_each(|(g, group)| pack_row_group(x, g, group));
    // SAFETY: every tile row of every group was written above.
    unsafe { data.set_len(mp * kp) };
    data
}

/// [`pack_rows_view`] of a small `[m, k]` view (a block of a gradient, or of an input transposed) into `out`
/// (`m` and `k` padded to 32) on this thread.
pub(crate) fn pack_rows_into(view: MatRef, out: &mut [u16]) {
    let (m, k) = (view.rows(), view.cols());
    assert!(can_pack(), "pack_rows_into: AVX-512 BF16");
    let kp = k.next_multiple_of(STEP);
    assert_eq!(out.len(), m.next_multiple_of(BLOCK) * kp, "pack_rows_into: output");
    // SAFETY: a `u16` slice viewed as possibly uninitialised `u16`s, only ever written with initialised values.
    let out = unsafe { &mut *(out as *mut [u16] as *mut [std::mem::MaybeUninit<u16>]) };
    out.chunks_exact_mut(TILE_ROWS * kp).enumerate().for_each(|(g, group)| pack_row_group(view, g, group));
}

/// Rows `16g..16g + 16` of [`pack_rows_view`] (`kp / 32` tiles), rows and inputs past the view's zeros.
fn pack_row_group(x: MatRef, g: usize, group: &mut [std::mem::MaybeUninit<u16>]) {
    let (m, k) = (x.rows(), x.cols());
    for (s, tile) in group.chunks_exact_mut(TILE_ROWS * STEP).enumerate() {
        let k0 = s * STEP;
        let width = STEP.min(k - k0);
        for (i, out) in tile.chunks_exact_mut(STEP).enumerate() {
            let row = g * TILE_ROWS + i;
            let mut src = [0.0f32; STEP];
            if row < m {
                x.copy_row_into(row, k0..k0 + width, &mut src[..width]);
            }
            // SAFETY: every caller checked `can_pack()`: AVX-512 BF16.
            unsafe { kernels::round_32(&src, out) };
        }
    }
}

/// `y = x·w + bias` for `x` `[m, k]` and `w` packed by [`pack_rhs`], on this CPU's [`unit()`]; `[m, n]`.
pub fn linear(x: &[f32], m: usize, k: usize, w: &PackedRhs, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    ensure!(x.len() == m * k, "bf16 linear: input does not hold {m}×{k}");
    linear_view(MatRef::row_major(x, m, k)?, w, bias)
}

/// [`linear`] for the `[m, k]` view `x`: a transposed view multiplies `xᵀ` (a weight gradient's `xᵀ·dy`).
pub fn linear_view(x: MatRef, w: &PackedRhs, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let Some(unit) = unit() else { bail!("bf16 products need {}", unavailable_reason()) };
    linear_view_on(unit, x, w, bias)
}

/// [`linear_view`] on the given unit (the tests run each unit the CPU has).
fn linear_view_on(unit: Bf16Unit, x: MatRef, w: &PackedRhs, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let (m, k) = (x.rows(), x.cols());
    ensure!(w.k == k, "bf16 linear: weight takes {} inputs, got {k}", w.k);
    let n = w.n;
    let np = n.next_multiple_of(BLOCK);
    let mut bias_padded = vec![0.0f32; np];
    if let Some(b) = bias {
        ensure!(b.len() == n, "bf16 linear: bias has {} elements, {n} needed", b.len());
        bias_padded[..n].copy_from_slice(b);
    }
    let a = pack_rows_view(x);
    let kp = w.padded_k();
    // Not zeroed: the blocks below write every element (a zeroed 39 MB output cost a memset per product).
    let mut y = Vec::<f32>::with_capacity(m * n);
    let out = SharedOut(y.as_mut_ptr());
    // Outputs in chunks whose right-hand panels (`kp · chunk` bf16) stay in L2 while every row block passes.
    let chunk = ((768 * 1024 / (2 * kp)) / BLOCK * BLOCK).max(BLOCK);
    let group_len = TILE_ROWS * kp; // bf16 elements of 16 packed rows
    let half_panel = rhs_panel_len(k); // bf16 elements of a panel of 16 outputs
    for n0 in (0..np).step_by(chunk) {
        let cols = n0..(n0 + chunk).min(np);
        (0..m.div_ceil(BLOCK)).into_par_iter().for_each(|mb| {
            let out = &out;
            let session = TileSession::start_on(unit);
            let a0 = &a[2 * mb * group_len..];
            let a1 = &a[(2 * mb + 1) * group_len..];
            for nb in cols.clone().step_by(BLOCK) {
                let b0 = &w.data[(nb / TILE_ROWS) * half_panel..];
                let b1 = &w.data[(nb / TILE_ROWS + 1) * half_panel..];
                let (rows, width) = (BLOCK.min(m - mb * BLOCK), BLOCK.min(n.saturating_sub(nb)));
                // SAFETY: each operand slice holds `kp / 32` tiles from its start; each row block writes only
                // its own rows of `y`, within `m × n`.
                unsafe {
                    session.multiply_block(
                        [a0, a1],
                        [b0, b1],
                        kp / STEP,
                        &bias_padded[nb..],
                        out.0.add(mb * BLOCK * n + nb),
                        n,
                        rows,
                        width,
                    )
                };
            }
        });
    }
    // SAFETY: every row below m and column below n was written by exactly one block.
    unsafe { y.set_len(m * n) };
    Ok(y)
}

/// A thread's use of a [`Bf16Unit`] while it lives, through which every block product goes. On AMX it holds
/// the tile configuration (per thread; dropping it returns the tiles to their initial state, so context
/// switches stop saving them); the dot-product unit needs no state.
pub(crate) struct TileSession {
    unit: Bf16Unit,
}

impl TileSession {
    /// Starts using this CPU's unit. Panics unless [`available`].
    pub(crate) fn start() -> Self {
        Self::start_on(unit().expect("bf16 products used where available() is false"))
    }

    /// Starts using `unit`; panics unless the CPU has it (AMX: granted; dot products: AVX-512 BF16).
    fn start_on(unit: Bf16Unit) -> Self {
        match unit {
            Bf16Unit::AmxTiles => {
                assert!(amx::granted(), "AMX tiles used where they were not granted");
                // SAFETY: the tile state was granted to this process (asserted), which implies x86-64.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    amx::configure_tiles()
                };
            }
            Bf16Unit::Avx512Dot => assert!(dot::supported(), "AVX-512 BF16 used where the CPU lacks it"),
        }
        TileSession { unit }
    }

    /// The unit's `multiply_block`: a 32 × 32 block `y = bias + a·b` over `steps` steps of 32 inputs, its first
    /// `rows` rows and `cols` columns stored at row stride `stride`.
    ///
    /// # Safety
    /// The operands must hold `steps` tiles each and `y` must be valid for the rows and columns written.
    #[allow(clippy::too_many_arguments)]
    unsafe fn multiply_block(
        &self,
        a: [&[u16]; 2],
        b: [&[u16]; 2],
        steps: usize,
        bias: &[f32],
        y: *mut f32,
        stride: usize,
        rows: usize,
        cols: usize,
    ) {
        // A session exists only where its unit does (`start_on`), which is x86-64.
        #[cfg(target_arch = "x86_64")]
        match self.unit {
            Bf16Unit::AmxTiles => amx::multiply_block(a, b, steps, bias, y, stride, rows, cols),
            Bf16Unit::Avx512Dot => dot::multiply_block(a, b, steps, bias, y, stride, rows, cols),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 units are x86-64 only: {:?}", (self.unit, a, b, steps, bias, y, stride, rows, cols))
    }

    /// The unit's `accumulate_block`: `c[0..32, 0..32] += a·b` at row stride `stride`.
    ///
    /// # Safety
    /// As for [`Self::multiply_block`], `c` valid for the whole block.
    unsafe fn accumulate_block(&self, a: [&[u16]; 2], b: [&[u16]; 2], steps: usize, c: *mut f32, stride: usize) {
        #[cfg(target_arch = "x86_64")]
        match self.unit {
            Bf16Unit::AmxTiles => amx::accumulate_block(a, b, steps, c, stride),
            Bf16Unit::Avx512Dot => dot::accumulate_block(a, b, steps, c, stride),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 units are x86-64 only: {:?}", (self.unit, a, b, steps, c, stride))
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `start_on` (on x86-64, the only place a session exists).
        #[cfg(target_arch = "x86_64")]
        if self.unit == Bf16Unit::AmxTiles {
            unsafe { amx::release_tiles() };
        }
    }
}

/// Bf16 elements of the panel of 32 outputs [`multiply_panel`] takes for `k` inputs: two halves of 16
/// outputs, each `[kp/2][16][2]` (kp = `k` rounded up to 32; inputs 2i and 2i+1 of an output side by side,
/// as [`store_pair`] writes them, inputs past `k` zero).
pub(crate) fn panel_len(k: usize) -> usize {
    k.next_multiple_of(STEP) * BLOCK
}

/// `out[r, 0..cols] = bias + rows[r]·panel` for the `m` rows packed by [`pack_rows`] (`k` inputs) and a panel of
/// 32 outputs ([`panel_len`]); `out` has row stride `stride`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn multiply_panel(
    session: &TileSession,
    rows: &[u16],
    m: usize,
    k: usize,
    panel: &[u16],
    bias: &[f32; BLOCK],
    out: &mut [f32],
    stride: usize,
    cols: usize,
) {
    let kp = k.next_multiple_of(STEP);
    let group_len = TILE_ROWS * kp;
    assert!(rows.len() >= m.next_multiple_of(BLOCK) * kp && panel.len() == panel_len(k), "multiply_panel: operands");
    assert!(
        cols <= BLOCK && stride >= cols && out.len() >= m.saturating_sub(1) * stride + cols,
        "multiply_panel: output"
    );
    let (b0, b1) = panel.split_at(panel.len() / 2);
    for mb in 0..m.div_ceil(BLOCK) {
        let (a0, a1) = (&rows[2 * mb * group_len..], &rows[(2 * mb + 1) * group_len..]);
        let valid = BLOCK.min(m - mb * BLOCK);
        // SAFETY: the operands hold kp / 32 tiles each (asserted above); the block writes rows mb·32.. of `out`
        // (valid of them) and `cols` columns, within its length.
        unsafe {
            session.multiply_block(
                [a0, a1],
                [b0, b1],
                kp / STEP,
                bias,
                out.as_mut_ptr().add(mb * BLOCK * stride),
                stride,
                valid,
                cols,
            )
        };
    }
}

/// `c[0..32, 0..32] += a·b` for one block: `a` two row tiles and `b` two output tiles of `steps` tiles each (as
/// [`pack_rows_into`] and [`pack_rhs_into`] or [`pack_transposed_tile`] lay them out), `c` with row stride
/// `stride` (a gradient block accumulated over calls, in memory between them).
pub(crate) fn accumulate_block(
    session: &TileSession,
    a: [&[u16]; 2],
    b: [&[u16]; 2],
    steps: usize,
    c: &mut [f32],
    stride: usize,
) {
    assert!(a.iter().chain(&b).all(|o| o.len() >= steps * TILE_ROWS * STEP), "accumulate_block: operands");
    assert!(stride >= BLOCK && c.len() >= (BLOCK - 1) * stride + BLOCK, "accumulate_block: output");
    // SAFETY: the operands hold `steps` tiles each and `c` the whole block (asserted above).
    unsafe { session.accumulate_block(a, b, steps, c.as_mut_ptr(), stride) };
}

/// `out = a·b` for one 32 × 32 block (row stride 32), operands as for [`accumulate_block`].
pub(crate) fn multiply_block_into(
    session: &TileSession,
    a: [&[u16]; 2],
    b: [&[u16]; 2],
    steps: usize,
    out: &mut [f32; BLOCK * BLOCK],
) {
    const ZERO: [f32; BLOCK] = [0.0; BLOCK];
    // SAFETY: each unit's `multiply_block` asserts the operands' lengths, and `out` holds the whole block at row
    // stride 32.
    unsafe { session.multiply_block(a, b, steps, &ZERO, out.as_mut_ptr(), BLOCK, BLOCK, BLOCK) };
}

/// A 32 × 32 f32 tile (row stride 32) transposed and rounded to bf16 as the right-hand operand of one step:
/// its 32 columns are the step's inputs, its rows the outputs, rows `16h..16h + 16` in `out[h]` (512 bf16,
/// input pairs interleaved as `tdpbf16ps` takes them). How a merged weight tile `M` multiplies as `Mᵀ`.
pub(crate) fn pack_transposed_tile(tile: &[f32], out: [&mut [u16]; 2]) {
    assert!(can_pack(), "pack_transposed_tile: AVX-512 BF16");
    // SAFETY: AVX-512 BF16 is present (asserted); the kernel asserts the lengths.
    unsafe { kernels::pack_transposed_tile(tile, out) };
}

/// Rounds one input pair of 16 outputs (`even`: input 2i, `odd`: input 2i+1) to bf16 and stores it at `out`
/// (32 bf16) in the order `tdpbf16ps` takes: how a merge writes a panel ([`panel_len`]).
///
/// # Safety
/// The CPU must have AVX-512 BF16 and BW ([`available`] implies both), and `out` must be valid for 32 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
pub(crate) unsafe fn store_pair(out: *mut u16, even: std::arch::x86_64::__m512, odd: std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
    _mm512_storeu_si512(out.cast(), _mm512_permutexvar_epi16(kernels::pair_order(), both));
}

/// The 16 × 16 matrix of 32-bit words in `rows` transposed (row `p` of the result holds word `p` of every
/// input row): two rounds of unpacks transpose each 128-bit lane's 4 × 4 blocks, then two rounds of lane
/// shuffles move the blocks.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`] implies it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose_16x16(
    rows: [std::arch::x86_64::__m512i; TILE_ROWS],
) -> [std::arch::x86_64::__m512i; TILE_ROWS] {
    use std::arch::x86_64::*;
    let r = rows;
    // a[4i..4i + 4]: rows 4i..4i + 4 interleaved in pairs; b[4i + j]: column 4L + j of those rows in lane L.
    let a: [__m512i; 16] = std::array::from_fn(|x| {
        let (pair, hi) = (x / 2, x % 2 == 1);
        let (u, v) = (r[2 * pair], r[2 * pair + 1]);
        if hi {
            _mm512_unpackhi_epi32(u, v)
        } else {
            _mm512_unpacklo_epi32(u, v)
        }
    });
    let b: [__m512i; 16] = std::array::from_fn(|x| {
        let (i, j) = (x / 4, x % 4);
        let (u, v) = (a[4 * i + j / 2], a[4 * i + 2 + j / 2]);
        if j % 2 == 1 {
            _mm512_unpackhi_epi64(u, v)
        } else {
            _mm512_unpacklo_epi64(u, v)
        }
    });
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0x44>(b[j], b[4 + j]);
        let c1 = _mm512_shuffle_i32x4::<0xEE>(b[j], b[4 + j]);
        let d0 = _mm512_shuffle_i32x4::<0x44>(b[8 + j], b[12 + j]);
        let d1 = _mm512_shuffle_i32x4::<0xEE>(b[8 + j], b[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0x88>(c0, d0);
        out[4 + j] = _mm512_shuffle_i32x4::<0xDD>(c0, d0);
        out[8 + j] = _mm512_shuffle_i32x4::<0x88>(c1, d1);
        out[12 + j] = _mm512_shuffle_i32x4::<0xDD>(c1, d1);
    }
    out
}

/// The output's base pointer, shared by the row blocks, which write disjoint rows.
struct SharedOut(*mut f32);
// SAFETY: only ever used for disjoint writes, one row block per task.
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::{BLOCK, STEP, TILE_ROWS};

    /// Rounds 32 floats to bf16 (to nearest even), writing all of `out[..32]`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_32(src: &[f32; STEP], out: &mut [std::mem::MaybeUninit<u16>]) {
        assert!(out.len() >= STEP);
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(out.as_mut_ptr().cast(), packed);
    }

    /// The 16-bit lanes that interleave two rows converted together (row a in lanes 0..16, row b in 16..32)
    /// as `tdpbf16ps` takes input pairs: a0 b0 a1 b1 ...
    #[target_feature(enable = "avx512f,avx512bw")]
    pub fn pair_order() -> __m512i {
        _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        )
    }

    /// Rounds rows `a` and `b` (16 outputs of inputs 2i and 2i+1) to bf16, interleaved: a0 b0 a1 b1 ...
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub unsafe fn interleave_pair(a: &[f32; TILE_ROWS], b: &[f32; TILE_ROWS], out: &mut [u16]) {
        assert!(out.len() >= 2 * TILE_ROWS);
        super::store_pair(out.as_mut_ptr(), _mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(b.as_ptr()));
    }

    /// See [`super::pack_transposed_tile`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_transposed_tile(tile: &[f32], out: [&mut [u16]; 2]) {
        assert!(tile.len() >= BLOCK * BLOCK && out.iter().all(|o| o.len() >= TILE_ROWS * STEP));
        for (h, out) in out.into_iter().enumerate() {
            // Row r's word p: its columns 2p and 2p + 1 rounded, the even one low; transposed, word p's row.
            let rows: [__m512i; TILE_ROWS] = std::array::from_fn(|i| {
                let row = tile.as_ptr().add((h * TILE_ROWS + i) * BLOCK);
                std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row.add(16)), _mm512_loadu_ps(row)))
            });
            for (p, pair) in super::transpose_16x16(rows).iter().enumerate() {
                _mm512_storeu_si512(out.as_mut_ptr().add(p * 2 * TILE_ROWS).cast(), *pair);
            }
        }
    }
}

/// Elsewhere [`available`] is false, so nothing below is ever called; the signatures keep the callers
/// architecture-neutral.
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    const UNREACHABLE: &str = "bf16 products are x86-64 only; available() is false here";

    pub unsafe fn round_32(_: &[f32; super::STEP], _: &mut [std::mem::MaybeUninit<u16>]) {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn interleave_pair(_: &[f32; super::TILE_ROWS], _: &[f32; super::TILE_ROWS], _: &mut [u16]) {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn pack_transposed_tile(_: &[f32], _: [&mut [u16]; 2]) {
        unreachable!("{UNREACHABLE}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::values;

    fn bf16(v: f32) -> f64 {
        half::bf16::from_f32(v).to_f64()
    }

    /// Every unit this CPU has, whether or not [`unit()`] picked it (an Intel CPU with AMX also runs the dot
    /// products, slowly, and one without AMX still has them).
    fn units_here() -> Vec<Bf16Unit> {
        let amx = amx::granted().then_some(Bf16Unit::AmxTiles);
        amx.into_iter().chain(dot::supported().then_some(Bf16Unit::Avx512Dot)).collect()
    }

    /// Odd shapes (rows, inputs and outputs that are not multiples of 16 or 32, and whole blocks) against
    /// the f64 sum of the rounded operands' products, on each unit: what is left is f32 accumulation.
    #[test]
    fn products_equal_the_rounded_operands_products() {
        // Where there is no unit the backend refuses bf16 (tested in tests/cli.rs), and nothing runs here.
        for unit in units_here() {
            for &(m, k, n) in &[(37, 70, 45), (64, 96, 64), (5, 33, 17), (70, 300, 100)] {
                let (x, w, b) = (values(m * k, 1), values(k * n, 2), values(n, 3));
                let x_rows = MatRef::row_major(&x, m, k).unwrap();
                let y = linear_view_on(unit, x_rows, &pack_rhs(&w, k, n).unwrap(), Some(&b)).unwrap();
                let mut worst = 0.0f64;
                let mut scale = 0.0f64;
                for i in 0..m {
                    for j in 0..n {
                        let want =
                            b[j] as f64 + (0..k).map(|kk| bf16(x[i * k + kk]) * bf16(w[kk * n + j])).sum::<f64>();
                        worst = worst.max((y[i * n + j] as f64 - want).abs());
                        scale = scale.max(want.abs());
                    }
                }
                assert!(worst <= 1e-6 * scale, "{unit}, {m}×{k}×{n}: off by {worst:e} of {scale:e}");
                // And really rounded: the f32 product differs.
                let exact: f64 = b[0] as f64 + (0..k).map(|kk| x[kk] as f64 * w[kk * n] as f64).sum::<f64>();
                assert!((y[0] as f64 - exact).abs() > 1e-6 * scale, "{unit}, {m}×{k}×{n}: not rounded to bf16");
                // Transposed views of both operands (how the backward packs `Wᵀ` and `xᵀ`) give the same product.
                let (xt, wt) = (crate::ops::transpose::transpose(&x, m, k), crate::ops::transpose::transpose(&w, k, n));
                let x_view = MatRef::row_major(&xt, k, m).unwrap().t();
                let w_view = MatRef::row_major(&wt, n, k).unwrap().t();
                let packed = pack_rhs_view(w_view).unwrap();
                assert_eq!(linear_view_on(unit, x_view, &packed, Some(&b)).unwrap(), y, "{unit}, {m}×{k}×{n} views");
            }
        }
    }

    /// `accumulate_block` adds a block's product to what its output holds (the accumulators start from it, so
    /// within f32 rounding of the sum), at a row stride wider than the block, leaving the rest of the rows
    /// alone; on each unit, against `multiply_block_into` of the same operands plus the prior values.
    #[test]
    fn accumulated_blocks_add_to_their_output() {
        for unit in units_here() {
            let (steps, stride) = (3, 40);
            let (x, w) = (values(BLOCK * steps * STEP, 4), values(steps * STEP * BLOCK, 5));
            let a = pack_rows(&x, BLOCK, steps * STEP);
            let packed = pack_rhs(&w, steps * STEP, BLOCK).unwrap();
            let (a0, a1) = a.split_at(a.len() / 2);
            let (b0, b1) = packed.block_panel(0).split_at(rhs_panel_len(steps * STEP));
            let session = TileSession::start_on(unit);
            let mut product = [0.0f32; BLOCK * BLOCK];
            multiply_block_into(&session, [a0, a1], [b0, b1], steps, &mut product);
            let want: f64 = (0..steps * STEP).map(|kk| bf16(x[kk]) * bf16(w[kk * BLOCK])).sum();
            assert!((product[0] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "{unit}: {} vs {want}", product[0]);
            let prior = values(BLOCK * stride, 6);
            let mut c = prior.clone();
            accumulate_block(&session, [a0, a1], [b0, b1], steps, &mut c, stride);
            for r in 0..BLOCK {
                for j in 0..stride {
                    let (got, was) = (c[r * stride + j], prior[r * stride + j]);
                    if j < BLOCK {
                        let want = was + product[r * BLOCK + j];
                        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{unit}: ({r}, {j}) {got} vs {want}");
                    } else {
                        assert_eq!(got, was, "{unit}: ({r}, {j}) outside the block");
                    }
                }
            }
        }
    }
}
