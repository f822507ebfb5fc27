//! The GPU executor: a CUDA context on one device, one stream, every kernel source compiled by NVRTC for
//! the device's own architecture (CUBIN) and loaded once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::launch::{check_args, int, Arg, Dims, Executor};
use super::{library, nvrtc};
use crate::kernels;

/// The driver's CUDA version as (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    library::driver()?;
    let mut v = 0;
    // SAFETY: the library is present; the out-pointer is valid.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if rc != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        bail!("cuDriverGetVersion failed: {rc:?}");
    }
    Ok((v / 1000, (v % 1000) / 10))
}

/// The oldest CUDA driver the driver bindings work with: cudarc's `cuda-13000` bindings (Cargo.toml) call entry
/// points that older drivers lack (`cuEventElapsedTime_v2`, from 12.8), and cudarc panics on a missing one.
pub const OLDEST_DRIVER: (i32, i32) = (13, 0);

/// Refuses a driver older than [`OLDEST_DRIVER`], naming both versions.
pub fn check_driver(version: (i32, i32)) -> Result<()> {
    let ((major, minor), (oldest_major, oldest_minor)) = (version, OLDEST_DRIVER);
    ensure!(
        version >= OLDEST_DRIVER,
        "the CUDA driver is {major}.{minor}, and this build's CUDA bindings need {oldest_major}.{oldest_minor} or \
         newer (update the driver)"
    );
    Ok(())
}

/// The number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize> {
    library::driver()?;
    let n = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver present but unusable: {e:?}"))?;
    if n <= 0 {
        bail!("CUDA driver present but no device");
    }
    Ok(n as usize)
}

/// Keeps the memory that buffers free in the device's default pool, for the next allocation. cudarc allocates
/// from that pool (`cuMemAllocAsync`); at the pool's default release threshold, 0, the driver hands every freed
/// byte back at each synchronisation: each result read to the host (an adaptation step reads each task's
/// entropy, then the gradients), and under `WEMOE_OP_TIMES` each operation. The next step or operation then
/// had its buffers' memory mapped anew. With no threshold, the pool holds the run's peak until the context ends.
fn keep_freed_pool_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys::{cuDeviceGetDefaultMemPool, cuMemPoolSetAttribute, CUmemPool_attribute, CUresult};
    let mut pool = std::ptr::null_mut();
    // SAFETY: the context exists, so the driver is loaded and its device valid; the device supports memory
    // pools (checked by the caller); the out-pointer is valid.
    let rc = unsafe { cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    ensure!(rc == CUresult::CUDA_SUCCESS, "cuDeviceGetDefaultMemPool failed: {rc:?}");
    // The attribute's value is a cuuint64_t, read through the pointer.
    let mut threshold = u64::MAX;
    let attribute = CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    // SAFETY: `pool` is the device's default pool, just returned; the value points to a live u64.
    let rc = unsafe { cuMemPoolSetAttribute(pool, attribute, (&mut threshold as *mut u64).cast()) };
    ensure!(rc == CUresult::CUDA_SUCCESS, "setting the release threshold failed: {rc:?}");
    Ok(())
}

/// Runs kernels on one GPU.
pub struct GpuExecutor {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// cuBLAS on the stream, made on first use: `Err` says why there is none (the products then run on
    /// the engine's own kernels).
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
}

impl GpuExecutor {
    /// A context on device `ordinal`; NVRTC must be loadable too (kernels compile on first use).
    pub fn new(ordinal: usize) -> Result<Self> {
        check_driver(driver_version()?)?;
        let count = device_count()?;
        if ordinal >= count {
            bail!("cuda:{ordinal}: this machine has {count} CUDA device(s)");
        }
        library::nvrtc()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: cannot create a context: {e:?}"))?;
        // One stream: ordering is the stream's, so cudarc's per-buffer event tracking is not needed.
        // SAFETY: no buffers exist yet.
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            // Only speed depends on it, so a refusal is a warning, not a failure.
            if let Err(e) = keep_freed_pool_memory(&ctx) {
                eprintln!(
                    "warning: cuda:{ordinal}: {e:#}; freed device memory goes back to the driver at each \
                     synchronisation (slower, the same results)"
                );
            }
        }
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("cuda:{ordinal}: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let stream = ctx.default_stream();
        Ok(GpuExecutor {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
        })
    }

    /// The error of an allocation or copy `what` that failed with `e`: for a device out of memory, how much is
    /// free and what needs less.
    fn memory_error(&self, what: String, e: DriverError) -> anyhow::Error {
        if e.0 != CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return anyhow!("{what}: {e:?}");
        }
        let free = self.free_memory().map_or(String::new(), |f| format!(", {} MiB free", f >> 20));
        anyhow!(
            "{what}: the GPU is out of memory ({}{free}); a smaller --batch-size, --weights streamed (embed, eval) or \
             --device cpu needs less",
            self.name
        )
    }

    /// The device's architecture, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The context (for libraries such as cuBLAS in benchmarks).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Milliseconds of device time that `work` enqueues, between two events on the stream.
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(|e| anyhow!("{e:?}"))?;
        work()?;
        let end = self.stream.record_event(flags).map_err(|e| anyhow!("{e:?}"))?;
        start.elapsed_ms(&end).map_err(|e| anyhow!("event timing: {e:?}"))
    }

    /// cuBLAS on this executor's stream, or why it cannot be had (no libcublas on the loader's path, or no
    /// handle). Plain dense products go to it (`Executor::vendor_product`).
    pub fn blas(&self) -> std::result::Result<&CudaBlas, &str> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only dlopen attempts.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err("no libcublas on the loader's path".into());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| format!("cuBLAS handle: {e:?}"))
            })
            .as_ref()
            .map_err(String::as_str)
    }

    fn function(&self, name: &str, source: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(source) {
                Some(m) => m.clone(),
                None => {
                    let src = kernels::sources()
                        .find(|s| s.name == source)
                        .with_context(|| format!("kernel source {source}.cu is not embedded"))?;
                    let compiled = nvrtc::compile(src, &self.arch)?;
                    let cached = compiled.cached_at.filter(|_| compiled.from_cache);
                    let load = |cubin| self.ctx.load_module(Ptx::from_binary(cubin));
                    let loaded = match (load(compiled.cubin), cached) {
                        (Err(e), Some(at)) => {
                            // Damaged on disk since it was written: compiled again, its cache entry replaced.
                            let at = at.display();
                            eprintln!("warning: {at}: the driver refused this cached CUBIN ({e:?}); compiling again");
                            load(nvrtc::recompile(src, &self.arch)?.cubin)
                        }
                        (loaded, _) => loaded,
                    };
                    let m = loaded.map_err(|e| anyhow!("loading {source}.cu's CUBIN for {}: {e:?}", self.arch))?;
                    modules.insert(source, m.clone());
                    m
                }
            }
        };
        let f = module.load_function(name).map_err(|e| anyhow!("kernel {name} in {source}.cu: {e:?}"))?;
        self.functions.lock().unwrap().insert(name.to_string(), f.clone());
        Ok(f)
    }
}

impl Executor for GpuExecutor {
    type Buffer = CudaSlice<f32>;

    fn describe(&self) -> String {
        format!("{} ({})", self.name, self.arch)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| self.memory_error(format!("copy of {} values to the GPU", data.len()), e))
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(len.max(1)).map_err(|e| self.memory_error(format!("GPU allocation of {len} values"), e))
    }

    fn download(&self, buffer: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buffer).map_err(|e| anyhow!("copy from the GPU: {e:?}"))
    }

    fn len(&self, buffer: &CudaSlice<f32>) -> usize {
        buffer.len()
    }

    fn launch(&self, name: &str, dims: Dims, args: &[Arg<'_, CudaSlice<f32>>]) -> Result<()> {
        let signature = check_args(name, args)?;
        dims.check(name)?;
        let function = self.function(name, signature.source)?;
        // Every argument's value in an 8-byte slot that outlives the builder (which keeps pointers to them).
        let slots: Vec<u64> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => b.device_ptr(&self.stream).0,
                Arg::Null => 0,
                Arg::I32(v) => *v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::F64(v) => v.to_bits(),
            })
            .collect();
        let as_i32: Vec<i32> = slots.iter().map(|&s| s as u32 as i32).collect();
        let as_f32: Vec<f32> = slots.iter().map(|&s| f32::from_bits(s as u32)).collect();
        let as_f64: Vec<f64> = slots.iter().map(|&s| f64::from_bits(s)).collect();
        let mut builder = self.stream.launch_builder(&function);
        for (i, a) in args.iter().enumerate() {
            match a {
                Arg::Buf(_) | Arg::Null => builder.arg(&slots[i]),
                Arg::I32(_) => builder.arg(&as_i32[i]),
                Arg::F32(_) => builder.arg(&as_f32[i]),
                Arg::F64(_) => builder.arg(&as_f64[i]),
            };
        }
        let cfg = LaunchConfig { grid_dim: dims.grid, block_dim: dims.block, shared_mem_bytes: 0 };
        // SAFETY: the arguments match the kernel's signature (checked above); buffer extents are each op's
        // contract, checked by its wrapper in ops.rs.
        unsafe { builder.launch(cfg) }.map_err(|e| anyhow!("launch of {name}: {e:?}"))?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("GPU: {e:?}"))
    }

    fn free_memory(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn measure_ms(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.time_ms(work).map(f64::from)
    }

    /// cuBLAS's SGEMM in its default math mode (exact f32: no TF32). Read column-major, row-major `c` is the
    /// `n × m` matrix `cᵀ = bᵀ·aᵀ`: cuBLAS multiplies `b`'s column-major view (`n × k` when stored `[k, n]`,
    /// transposed when stored `[n, k]`) by `a`'s (`k × m`).
    fn vendor_product(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
        b_transposed: bool,
    ) -> Result<bool> {
        let Ok(blas) = self.blas() else { return Ok(false) };
        ensure!(
            a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
            "vendor_product: buffers of {}, {} and {} values for [{m}, {k}]·[{k}, {n}]",
            a.len(),
            b.len(),
            c.len()
        );
        if m == 0 || n == 0 {
            return Ok(true);
        }
        let (mi, ki, ni) = (int(m, "rows")?, int(k, "inner size")?, int(n, "columns")?);
        // b stored [n, k] is column-major k × n: transposed to n × k. Stored [k, n] it is n × k already.
        let (op_b, ld_b) =
            if b_transposed { (cublasOperation_t::CUBLAS_OP_T, ki) } else { (cublasOperation_t::CUBLAS_OP_N, ni) };
        let (pa, _ga) = a.device_ptr(&self.stream);
        let (pb, _gb) = b.device_ptr(&self.stream);
        let (pc, _gc) = c.device_ptr(&self.stream);
        self.ctx.bind_to_thread().map_err(|e| anyhow!("cuBLAS: binding the context: {e:?}"))?;
        let (one, zero) = (1.0f32, 0.0f32);
        // SAFETY: the three buffers are live device allocations holding the extents checked above; the
        // handle runs on this executor's stream, so the product is ordered with every launch.
        unsafe {
            cudarc::cublas::result::sgemm(
                *blas.handle(),
                op_b,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &one,
                pb as *const f32,
                ld_b,
                pa as *const f32,
                ki,
                &zero,
                pc as *mut f32,
                ni,
            )
        }
        .map_err(|e| anyhow!("cuBLAS SGEMM [{m}, {k}]·[{k}, {n}]: {e:?}"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_older_than_the_bindings_is_refused_by_version() {
        let err = format!("{:#}", check_driver((12, 4)).unwrap_err());
        assert_eq!(
            err,
            "the CUDA driver is 12.4, and this build's CUDA bindings need 13.0 or newer (update the driver)"
        );
        assert!(check_driver((12, 9)).is_err());
        for ok in [(13, 0), (13, 2), (14, 0)] {
            check_driver(ok).unwrap();
        }
    }
}
