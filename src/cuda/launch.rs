//! What a kernel launch is, independent of where it runs: the grid and block shape, the arguments, and
//! the [`Executor`] that runs it (the GPU through the driver, or the host emulation). Arguments are
//! checked against the kernel's signature, parsed from its source at build time, before either runs it.

use anyhow::{bail, Context, Result};

use crate::kernels::{self, KernelFunction, ParamKind};

/// Grid and block dimensions (x, y, z).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Blocks in the grid.
    pub grid: (u32, u32, u32),
    /// Threads in a block.
    pub block: (u32, u32, u32),
}

impl Dims {
    /// Checks the shape against CUDA's launch limits (every dimension at least 1; grid x below 2³¹, y and z
    /// at most 65,535; at most 1,024 threads a block, z at most 64), so that the host emulation refuses what a
    /// card would.
    pub fn check(&self, kernel: &str) -> Result<()> {
        let (g, b) = (self.grid, self.block);
        let threads = u64::from(b.0) * u64::from(b.1) * u64::from(b.2);
        let ok = [g.0, g.1, g.2, b.0, b.1, b.2].iter().all(|&d| d >= 1)
            && g.0 < 1 << 31
            && g.1 <= 65_535
            && g.2 <= 65_535
            && b.2 <= 64
            && threads <= 1024;
        if !ok {
            bail!("launch of {kernel}: grid {g:?} × block {b:?} is outside CUDA's launch limits");
        }
        Ok(())
    }

    /// A 1-D launch of `threads` per block over enough blocks for `n` elements (at most `max_blocks`; the
    /// kernels use grid-stride loops).
    pub fn elementwise(n: usize, threads: u32, max_blocks: u32) -> Self {
        let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks as usize) as u32;
        Dims { grid: (blocks, 1, 1), block: (threads, 1, 1) }
    }
}

/// One kernel argument.
pub enum Arg<'a, B> {
    /// A device buffer.
    Buf(&'a B),
    /// A null pointer (optional inputs and outputs).
    Null,
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// Where kernels run: the GPU, or the host emulation of the same sources.
pub trait Executor {
    /// A buffer of f32 on this executor's device.
    type Buffer;
    /// A short description, e.g. "NVIDIA H200 (sm_90)".
    fn describe(&self) -> String;
    /// A buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer>;
    /// A zeroed buffer of `len` values.
    fn zeros(&self, len: usize) -> Result<Self::Buffer>;
    /// The buffer's values.
    fn download(&self, buffer: &Self::Buffer) -> Result<Vec<f32>>;
    /// The buffer's length in values.
    fn len(&self, buffer: &Self::Buffer) -> usize;
    /// Runs kernel `name` (after [`check_args`]).
    fn launch(&self, name: &str, dims: Dims, args: &[Arg<'_, Self::Buffer>]) -> Result<()>;
    /// Waits for every launch so far.
    fn synchronize(&self) -> Result<()>;

    /// Bytes of device memory free now, where the executor's device has a bound of its own (a GPU); `None` in
    /// the emulation, whose buffers are host memory.
    fn free_memory(&self) -> Option<u64> {
        None
    }

    /// Milliseconds that `work` takes here: device time between two events on a GPU, wall time in the
    /// emulation. For choosing among kernels that compute the same thing.
    fn measure_ms(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64>;

    /// `c [m, n] = a [m, k] · b` (row-major), `b` stored `[k, n]` or, with `b_transposed`, `[n, k]`, by a
    /// vendor library's f32 GEMM where this executor has one (cuBLAS on a GPU); `Ok(false)` where it has
    /// none, and the caller runs its own kernel. Plain dense products only: WEMoE's merged weights never
    /// pass here per sample.
    #[allow(clippy::too_many_arguments)]
    fn vendor_product(
        &self,
        a: &Self::Buffer,
        b: &Self::Buffer,
        c: &Self::Buffer,
        m: usize,
        k: usize,
        n: usize,
        b_transposed: bool,
    ) -> Result<bool> {
        let _ = (a, b, c, m, k, n, b_transposed);
        Ok(false)
    }
}

/// Checks `args` against the signature of kernel `name`; returns the signature.
pub fn check_args<B>(name: &str, args: &[Arg<'_, B>]) -> Result<&'static KernelFunction> {
    let f = kernels::function(name).with_context(|| format!("no kernel function '{name}' in kernels/"))?;
    if f.params.len() != args.len() {
        bail!("kernel {name}: {} arguments given, its signature has {}", args.len(), f.params.len());
    }
    for ((kind, arg), pname) in f.params.iter().zip(args).zip(f.param_names) {
        let ok = matches!(
            (kind, arg),
            (ParamKind::ConstF32Ptr | ParamKind::F32Ptr, Arg::Buf(_) | Arg::Null)
                | (ParamKind::I32, Arg::I32(_))
                | (ParamKind::F32, Arg::F32(_))
                | (ParamKind::F64, Arg::F64(_))
        );
        if !ok {
            bail!("kernel {name}: argument '{pname}' is not a {kind:?}");
        }
    }
    Ok(f)
}

/// A size as a kernel's `int`, or an error naming it.
pub fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).with_context(|| format!("{what} = {value} does not fit a kernel's int"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_outside_cudas_limits_are_refused() {
        let ok = Dims { grid: (70_000, 65_535, 1), block: (256, 4, 1) };
        ok.check("k").unwrap();
        for bad in [
            Dims { grid: (0, 1, 1), block: (128, 1, 1) },
            Dims { grid: (1, 65_536, 1), block: (128, 1, 1) },
            Dims { grid: (1, 1, 70_000), block: (128, 1, 1) },
            Dims { grid: (1, 1, 1), block: (1025, 1, 1) },
            Dims { grid: (1, 1, 1), block: (32, 32, 2) },
            Dims { grid: (1, 1, 1), block: (1, 1, 65) },
        ] {
            let e = bad.check("expert_linear_forward").unwrap_err().to_string();
            assert!(e.contains("expert_linear_forward") && e.contains("launch limits"), "{bad:?}: {e}");
        }
    }
}
