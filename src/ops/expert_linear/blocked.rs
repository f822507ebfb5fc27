//! The blocked layout each WEMoE weight is stored in on the CPU: `[⌈out/32⌉, in, 32]`, so that a tile of 32
//! outputs × a chunk of inputs is one contiguous run of memory, which the merges stream.

use rayon::prelude::*;

use super::BLOCK_ROWS;

/// The shape of a blocked weight of `out` outputs and `inp` inputs (see [`to_blocked`]).
pub fn blocked_shape(out: usize, inp: usize) -> [usize; 3] {
    [out.div_ceil(BLOCK_ROWS), inp, BLOCK_ROWS]
}

/// The elements a blocked weight of `out` outputs and `inp` inputs holds.
pub(super) fn blocked_len(out: usize, inp: usize) -> usize {
    blocked_shape(out, inp).iter().product()
}

/// PyTorch's `[out, in]` weight in the blocked layout `[⌈out/32⌉, in, 32]`: block `b` holds outputs
/// `32b..32b + 32` (zeros past `out`), input by input, so element (output `j`, input `kk`) is at
/// `((j / 32) · in + kk) · 32 + j % 32`.
///
/// Why: the per-sample merge reads a tile of 32 outputs × 32 inputs from each of the T + 1 sources. In the
/// `[in, out]` layout each of the tile's rows lies in another 4 KiB page, which the hardware prefetcher does
/// not cross, so every source row missed the cache; blocked, a block's tiles follow each other in memory.
/// Measured at ViT-B/32 shapes with 8 experts: the merge's share of the per-sample layer fell from 20% to 12%
/// (BENCHMARKS.md).
pub fn to_blocked(weight: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(weight.len(), out * inp, "to_blocked: the weight is not {out}×{inp}");
    let len = blocked_len(out, inp);
    // Tile by tile: 32 rows gathered, transposed in a local array, stored as one contiguous 4 KiB run, and
    // nothing zeroed first. Scattered element by element into a zeroed vector, the 9 weights of a B/32 WEMoE
    // linear (8 experts) took 22–23 ms against 12–13 now, most of the time `embed` spent loading a WEMoE model
    // (`prepare_expert_linear` in BENCHMARKS.md).
    let mut blocked = Vec::with_capacity(len);
    blocked.spare_capacity_mut()[..len].par_chunks_mut(inp * BLOCK_ROWS).enumerate().for_each(|(bi, block)| {
        let (j0, rows) = (bi * BLOCK_ROWS, BLOCK_ROWS.min(out - bi * BLOCK_ROWS));
        // The 32 × 32 tile of outputs × inputs, gathered row by row; rows past `out` stay zero (the padding).
        let mut tile = [0.0f32; BLOCK_ROWS * BLOCK_ROWS];
        let mut transposed = [0.0f32; BLOCK_ROWS * BLOCK_ROWS];
        for k0 in (0..inp).step_by(BLOCK_ROWS) {
            let kn = BLOCK_ROWS.min(inp - k0);
            for (jj, row) in tile.chunks_exact_mut(BLOCK_ROWS).take(rows).enumerate() {
                row[..kn].copy_from_slice(&weight[(j0 + jj) * inp + k0..][..kn]);
            }
            transpose_tile(&tile, &mut transposed);
            // Inputs k0..k0 + kn, 32 outputs each (columns past kn of the tile hold the last chunk's values and
            // land in rows not copied).
            let dst = &mut block[k0 * BLOCK_ROWS..(k0 + kn) * BLOCK_ROWS];
            dst.iter_mut().zip(&transposed).for_each(|(d, &v)| {
                d.write(v);
            });
        }
    });
    // SAFETY: each block's chunks k0 = 0, 32, … wrote its inputs 0..inp, 32 values each: all `len` elements.
    unsafe { blocked.set_len(len) };
    blocked
}

/// A 32 × 32 tile transposed. Fixed sizes let the compiler drop the bounds checks and unroll.
pub(super) fn transpose_tile(tile: &[f32; BLOCK_ROWS * BLOCK_ROWS], out: &mut [f32; BLOCK_ROWS * BLOCK_ROWS]) {
    for (j, row) in out.chunks_exact_mut(BLOCK_ROWS).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = tile[i * BLOCK_ROWS + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked layout puts (output j, input kk) where its doc says, zeros past the last output (a ragged
    /// block of outputs, a ragged tile of inputs).
    #[test]
    fn to_blocked_places_each_element_and_pads_with_zeros() {
        let (o, k) = (37, 45);
        let w: Vec<f32> = (0..o * k).map(|i| i as f32 + 1.0).collect();
        let b = to_blocked(&w, o, k);
        assert_eq!(b.len(), 2 * k * 32);
        for j in 0..64 {
            for kk in 0..k {
                let want = if j < o { w[j * k + kk] } else { 0.0 };
                assert_eq!(b[((j / 32) * k + kk) * 32 + j % 32], want, "output {j} input {kk}");
            }
        }
    }
}
