//! The host emulation executor: every kernel of `kernels/*.cu`, compiled as C++ by `build.rs` against
//! `kernels/host/cuda_host.h`, run on the CPU block by block (a block's threads as fibers). It is how the
//! kernels and their launch code are proven on machines without a GPU.

use std::cell::Cell;
use std::ffi::c_void;

use anyhow::{anyhow, ensure, Result};

use super::launch::{check_args, Arg, Dims, Executor};
use crate::ops::gemm::{matmul, MatRef, Threads};

type HostLauncher = unsafe extern "C" fn(*const u32, *const *mut c_void);

include!(concat!(env!("OUT_DIR"), "/host_kernels.rs"));

/// A buffer in host memory standing for device memory. Kernels write through raw pointers, so it is held
/// as one (never through a Rust reference while a kernel runs).
pub struct HostBuffer {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a HostBuffer owns its allocation exclusively, like a Box<[f32]>.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    fn from_vec(v: Vec<f32>) -> Self {
        let boxed = v.into_boxed_slice();
        let len = boxed.len();
        HostBuffer { ptr: Box::into_raw(boxed) as *mut f32, len }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr and len came from Box::into_raw of a boxed slice of this length.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// When the emulation lands a thread's asynchronous copies (`cp.async`) in shared memory: at the latest
/// moment CUDA allows, the wait that covers them (the default: a read that misses its wait sees stale data),
/// or at once (a copy into a buffer other threads still read overwrites it early). A kernel that stages
/// through `cp.async` must give the same result under both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyLanding {
    /// At the `cp.async.wait_group` that covers the copy.
    #[default]
    AtWait,
    /// When the copy is issued.
    AtIssue,
}

thread_local! {
    static LANDING: Cell<CopyLanding> = const { Cell::new(CopyLanding::AtWait) };
}

/// Runs `f` with this thread's host launches landing asynchronous copies as `landing` says.
pub fn with_copy_landing<R>(landing: CopyLanding, f: impl FnOnce() -> R) -> R {
    let before = LANDING.with(|l| l.replace(landing));
    // Restored however `f` ends, so a failing check cannot leak its mode into the thread's next test.
    struct Restore(CopyLanding);
    impl Drop for Restore {
        fn drop(&mut self) {
            LANDING.with(|l| l.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Runs kernels on the host.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostExecutor;

impl Executor for HostExecutor {
    type Buffer = HostBuffer;

    fn describe(&self) -> String {
        "host emulation".into()
    }

    fn upload(&self, data: &[f32]) -> Result<HostBuffer> {
        Ok(HostBuffer::from_vec(data.to_vec()))
    }

    fn zeros(&self, len: usize) -> Result<HostBuffer> {
        Ok(HostBuffer::from_vec(vec![0.0; len]))
    }

    fn download(&self, buffer: &HostBuffer) -> Result<Vec<f32>> {
        // SAFETY: no kernel runs (launches are synchronous here); ptr holds len values.
        Ok(unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.len) }.to_vec())
    }

    fn len(&self, buffer: &HostBuffer) -> usize {
        buffer.len
    }

    fn launch(&self, name: &str, dims: Dims, args: &[Arg<'_, HostBuffer>]) -> Result<()> {
        check_args(name, args)?;
        dims.check(name)?;
        let launcher = HOST_LAUNCHERS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| anyhow!("kernel {name} has no host launcher"))?;
        // One 8-byte slot per argument, holding the value the kernel parameter reads.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => b.ptr as u64,
                Arg::Null => 0,
                Arg::I32(v) => *v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::F64(v) => v.to_bits(),
            })
            .collect();
        let pointers: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let (g, b) = (dims.grid, dims.block);
        let landing = LANDING.with(Cell::get) as u32;
        let dims = [g.0, g.1, g.2, b.0, b.1, b.2, landing];
        // SAFETY: the arguments match the kernel's signature (checked above; little-endian slots), and the
        // buffers outlive the call. Bounds within buffers are each op's contract, checked by its wrapper.
        unsafe { launcher(dims.as_ptr(), pointers.as_ptr()) };
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn measure_ms(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let start = std::time::Instant::now();
        work()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// The emulation's stand-in for cuBLAS is the CPU GEMM, so that the CUDA backend's vendor path (the
    /// product, then its bias and activation as a kernel) runs in `cargo test` as it runs on a GPU.
    fn vendor_product(
        &self,
        a: &HostBuffer,
        b: &HostBuffer,
        c: &HostBuffer,
        m: usize,
        k: usize,
        n: usize,
        b_transposed: bool,
    ) -> Result<bool> {
        ensure!(
            a.len >= m * k && b.len >= k * n && c.len >= m * n,
            "vendor_product: buffers of {}, {} and {} values for [{m}, {k}]·[{k}, {n}]",
            a.len,
            b.len,
            c.len
        );
        ensure!(c.ptr != a.ptr && c.ptr != b.ptr, "vendor_product: the output is one of the inputs");
        // SAFETY: no kernel runs (launches are synchronous here); the lengths were checked above and the
        // output is a distinct allocation from both inputs (HostBuffers never overlap but by being the same).
        let (a, b, c) = unsafe {
            (
                std::slice::from_raw_parts(a.ptr, m * k),
                std::slice::from_raw_parts(b.ptr, k * n),
                std::slice::from_raw_parts_mut(c.ptr, m * n),
            )
        };
        let rhs = if b_transposed { MatRef::row_major(b, n, k)?.t() } else { MatRef::row_major(b, k, n)? };
        matmul(MatRef::row_major(a, m, k)?, rhs, c, false, Threads::All)?;
        Ok(true)
    }
}
