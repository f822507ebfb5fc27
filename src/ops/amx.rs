//! Matrix products on AMX tiles, bf16 operands and f32 accumulation: `--precision bf16` on the CPU (Intel
//! Sapphire Rapids and later). Each operand is rounded to bf16 (to nearest even) once, into the order the
//! tiles load it, and every product of two bf16 values is exact in f32, so the result is the f32 sum of the
//! rounded operands' products: what the tests check, and what the GPU's bf16 path computes.
//!
//! A block of 32 × 32 outputs lives in four accumulator tiles for the whole reduction; each step of 32
//! inputs loads two tiles of the left operand (16 rows × 32 inputs) and two of the right (16 pairs of inputs ×
//! 16 outputs, the pairs interleaved as `tdpbf16ps` takes them) and issues four `tdpbf16ps`.

use std::sync::OnceLock;

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::MatRef;

/// Whether this CPU and OS run AMX bf16 products (checked once: CPUID, then the Linux permission to use the
/// tile data state, which the kernel grants per process).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7 (present wherever AVX-512 is): EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the packing needs
    // AVX-512 BF16 and BW.
    let leaf7 = std::is_x86_feature_detected!("avx512f").then(|| std::arch::x86_64::__cpuid_count(7, 0));
    let amx = leaf7.is_some_and(|l| l.edx & (1 << 22) != 0 && l.edx & (1 << 24) != 0);
    if !(amx && std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")) {
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
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
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
    ensure!(available(), "bf16 products need AMX (Intel Sapphire Rapids or later)");
    let (k, n) = (w.rows(), w.cols());
    let (kp, np) = (k.next_multiple_of(STEP), n.next_multiple_of(BLOCK));
    let mut data = vec![0u16; kp * np];
    data.par_chunks_mut(kp * TILE_ROWS).enumerate().for_each(|(p, panel)| pack_rhs_panel(w, p, panel));
    Ok(PackedRhs { data, k, n })
}

/// Packs a small `[k, n]` right-hand side (a block of a gradient) into `out` on this thread, in [`pack_rhs`]'s
/// layout: `rhs_panel_len(k)` elements per panel of 16 outputs, `n` padded to 32.
pub(crate) fn pack_rhs_into(w: &[f32], k: usize, n: usize, out: &mut [u16]) {
    assert!(available() && w.len() == k * n, "pack_rhs_into: AMX and [{k}, {n}]");
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
        // SAFETY: `available()` (checked by every caller) implies AVX-512 BF16 and BW.
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
    assert!(available(), "pack_rows: AMX");
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
    assert!(available(), "pack_rows_into: AMX");
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
            // SAFETY: `available()` (checked by every caller) implies AVX-512 BF16.
            unsafe { kernels::round_32(&src, out) };
        }
    }
}

/// `y = x·w + bias` for `x` `[m, k]` and `w` packed by [`pack_rhs`], on AMX tiles; `[m, n]`.
pub fn linear(x: &[f32], m: usize, k: usize, w: &PackedRhs, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    ensure!(x.len() == m * k, "amx linear: input does not hold {m}×{k}");
    linear_view(MatRef::row_major(x, m, k)?, w, bias)
}

/// [`linear`] for the `[m, k]` view `x`: a transposed view multiplies `xᵀ` (a weight gradient's `xᵀ·dy`).
pub fn linear_view(x: MatRef, w: &PackedRhs, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let (m, k) = (x.rows(), x.cols());
    ensure!(w.k == k, "amx linear: weight takes {} inputs, got {k}", w.k);
    let n = w.n;
    let np = n.next_multiple_of(BLOCK);
    let mut bias_padded = vec![0.0f32; np];
    if let Some(b) = bias {
        ensure!(b.len() == n, "amx linear: bias has {} elements, {n} needed", b.len());
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
    let panel_len = TILE_ROWS * kp; // bf16 elements of a panel of 16 outputs
    for n0 in (0..np).step_by(chunk) {
        let cols = n0..(n0 + chunk).min(np);
        (0..m.div_ceil(BLOCK)).into_par_iter().for_each(|mb| {
            let out = &out;
            let _tiles = TileSession::start();
            let a0 = &a[2 * mb * group_len..];
            let a1 = &a[(2 * mb + 1) * group_len..];
            for nb in cols.clone().step_by(BLOCK) {
                let b0 = &w.data[(nb / TILE_ROWS) * panel_len..];
                let b1 = &w.data[(nb / TILE_ROWS + 1) * panel_len..];
                let (rows, width) = (BLOCK.min(m - mb * BLOCK), BLOCK.min(n.saturating_sub(nb)));
                // SAFETY: the tile state was granted (`pack_rhs` checked `available()`) and configured by the
                // session; each operand slice holds `kp / 32` tiles from its start; each row block writes only
                // its own rows of `y`, within `m × n`.
                unsafe {
                    kernels::multiply_block(
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

/// The tile state configured on this thread while it lives (the configuration is per thread; dropping it
/// returns the tiles to their initial state, so context switches stop saving them).
pub(crate) struct TileSession(());

impl TileSession {
    /// Configures the tiles. Panics unless [`available`] (the tile state must have been granted).
    pub(crate) fn start() -> Self {
        assert!(available(), "AMX tiles used where available() is false");
        // SAFETY: the tile state was granted to this process (available()).
        unsafe { kernels::configure_tiles() };
        TileSession(())
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `start`.
        unsafe { kernels::release_tiles() };
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
    _tiles: &TileSession,
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
        // SAFETY: the session configured the tiles; the operands hold kp / 32 tiles each (asserted above); the
        // block writes rows mb·32.. of `out` (valid of them) and `cols` columns, within its length.
        unsafe {
            kernels::multiply_block(
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
    _tiles: &TileSession,
    a: [&[u16]; 2],
    b: [&[u16]; 2],
    steps: usize,
    c: &mut [f32],
    stride: usize,
) {
    assert!(a.iter().chain(&b).all(|o| o.len() >= steps * TILE_ROWS * STEP), "accumulate_block: operands");
    assert!(stride >= BLOCK && c.len() >= (BLOCK - 1) * stride + BLOCK, "accumulate_block: output");
    // SAFETY: the session configured the tiles; the operands hold `steps` tiles each and `c` the whole block
    // (asserted above).
    unsafe { kernels::accumulate_block(a, b, steps, c.as_mut_ptr(), stride) };
}

/// `out = a·b` for one 32 × 32 block (row stride 32), operands as for [`accumulate_block`].
pub(crate) fn multiply_block_into(
    _tiles: &TileSession,
    a: [&[u16]; 2],
    b: [&[u16]; 2],
    steps: usize,
    out: &mut [f32; BLOCK * BLOCK],
) {
    const ZERO: [f32; BLOCK] = [0.0; BLOCK];
    // SAFETY: the session configured the tiles; `multiply_block` asserts the operands' lengths, and `out` holds
    // the whole block at row stride 32.
    unsafe { kernels::multiply_block(a, b, steps, &ZERO, out.as_mut_ptr(), BLOCK, BLOCK, BLOCK) };
}

/// A 32 × 32 f32 tile (row stride 32) transposed and rounded to bf16 as the right-hand operand of one step:
/// its 32 columns are the step's inputs, its rows the outputs, rows `16h..16h + 16` in `out[h]` (512 bf16,
/// input pairs interleaved as `tdpbf16ps` takes them). How a merged weight tile `M` multiplies as `Mᵀ`.
pub(crate) fn pack_transposed_tile(tile: &[f32], out: [&mut [u16]; 2]) {
    assert!(available(), "pack_transposed_tile: AMX");
    // SAFETY: `available()` implies AVX-512 BF16; the kernel asserts the lengths.
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
    use std::arch::asm;
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
    const UNREACHABLE: &str = "AMX is x86-64 only; available() is false here";

    pub unsafe fn round_32(_: &[f32; super::STEP], _: &mut [std::mem::MaybeUninit<u16>]) {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn interleave_pair(_: &[f32; super::TILE_ROWS], _: &[f32; super::TILE_ROWS], _: &mut [u16]) {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn configure_tiles() {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn release_tiles() {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn accumulate_block(_: [&[u16]; 2], _: [&[u16]; 2], _: usize, _: *mut f32, _: usize) {
        unreachable!("{UNREACHABLE}")
    }
    pub unsafe fn pack_transposed_tile(_: &[f32], _: [&mut [u16]; 2]) {
        unreachable!("{UNREACHABLE}")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn multiply_block(
        _: [&[u16]; 2],
        _: [&[u16]; 2],
        _: usize,
        _: &[f32],
        _: *mut f32,
        _: usize,
        _: usize,
        _: usize,
    ) {
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

    /// Odd shapes (rows, inputs and outputs that are not multiples of 16 or 32, and whole blocks) against
    /// the f64 sum of the rounded operands' products: what is left is f32 accumulation.
    #[test]
    fn products_equal_the_rounded_operands_products() {
        if !available() {
            // Nothing to run; the backend refuses bf16 here (tested in device::cpu).
            return;
        }
        for &(m, k, n) in &[(37, 70, 45), (64, 96, 64), (5, 33, 17), (70, 300, 100)] {
            let (x, w, b) = (values(m * k, 1), values(k * n, 2), values(n, 3));
            let y = linear(&x, m, k, &pack_rhs(&w, k, n).unwrap(), Some(&b)).unwrap();
            let mut worst = 0.0f64;
            let mut scale = 0.0f64;
            for i in 0..m {
                for j in 0..n {
                    let want = b[j] as f64 + (0..k).map(|kk| bf16(x[i * k + kk]) * bf16(w[kk * n + j])).sum::<f64>();
                    worst = worst.max((y[i * n + j] as f64 - want).abs());
                    scale = scale.max(want.abs());
                }
            }
            assert!(worst <= 1e-6 * scale, "{m}×{k}×{n}: off by {worst:e} of {scale:e}");
            // And really rounded: the f32 product differs.
            let exact: f64 = b[0] as f64 + (0..k).map(|kk| x[kk] as f64 * w[kk * n] as f64).sum::<f64>();
            assert!((y[0] as f64 - exact).abs() > 1e-6 * scale, "{m}×{k}×{n}: not rounded to bf16");
            // Transposed views of both operands (how the backward packs `Wᵀ` and `xᵀ`) give the same product.
            let (xt, wt) = (crate::ops::transpose::transpose(&x, m, k), crate::ops::transpose::transpose(&w, k, n));
            let x_view = MatRef::row_major(&xt, k, m).unwrap().t();
            let w_view = MatRef::row_major(&wt, n, k).unwrap().t();
            assert_eq!(linear_view(x_view, &pack_rhs_view(w_view).unwrap(), Some(&b)).unwrap(), y, "{m}×{k}×{n} views");
        }
    }
}
