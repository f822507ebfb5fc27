//! `wemoe-engine doctor`: what the engine sees: the CPU, the CUDA driver and devices (with cuBLAS), NVRTC,
//! the kernel cache, the Hugging Face cache where Hub names resolve, and one row per kernel function with
//! ptxas' registers, spills and shared memory for an architecture (the GPU's own, `--arch`, or sm_90 when
//! there is no GPU).

use anyhow::Result;
use wemoe_engine::cuda::{gpu, nvrtc, Executor, GpuExecutor};
use wemoe_engine::device::{Backend, CpuBackend};
use wemoe_engine::hub_cache::HubCache;
use wemoe_engine::kernels::{self, KERNEL_FUNCTIONS};

pub fn run(arch: Option<&str>) -> Result<()> {
    if let Some(a) = arch {
        nvrtc::check_arch(a).map_err(|e| anyhow::anyhow!("--arch: {e}"))?;
        // Where NVRTC loads, an architecture it cannot compile for is refused before the report.
        if nvrtc::version().is_ok() {
            nvrtc::check_supported(a).map_err(|e| anyhow::anyhow!("--arch: {e}"))?;
        }
    }
    say!("wemoe-engine {}", env!("CARGO_PKG_VERSION"));
    say!("cpu         {}", CpuBackend::new().describe());
    match wemoe_engine::ops::bf16::unit() {
        Some(unit) => say!("            {unit}: --precision bf16 runs on this CPU"),
        None => say!("            no AMX or AMD AVX-512 BF16: --precision bf16 needs a GPU here"),
    }
    if wemoe_engine::data::jpeg_simd() {
        say!("jpeg        libjpeg-turbo with its SIMD decoding");
    } else if cfg!(target_arch = "x86_64") {
        say!("jpeg        libjpeg-turbo without SIMD (install NASM and rebuild: about 1.6× faster JPEG decoding)");
    } else {
        say!("jpeg        libjpeg-turbo without SIMD");
    }
    let mut device_arch = None;
    match gpu::driver_version() {
        Err(e) => say!("cuda        {e:#}"),
        Ok((major, minor)) => match gpu::device_count() {
            Err(e) => say!("cuda        driver {major}.{minor}; {e:#}"),
            Ok(n) => {
                say!("cuda        driver {major}.{minor}, {n} device(s)");
                for i in 0..n {
                    match GpuExecutor::new(i) {
                        Ok(g) => {
                            say!("  cuda:{i}    {}", g.describe());
                            match g.blas() {
                                Ok(_) => say!("            cuBLAS: plain dense products run on it"),
                                Err(why) => {
                                    say!("            cuBLAS: {why}; dense products run on the engine's kernels")
                                }
                            }
                            device_arch.get_or_insert_with(|| g.arch().to_string());
                        }
                        Err(e) => say!("  cuda:{i}    {e:#}"),
                    }
                }
            }
        },
    }
    let nvrtc_version = nvrtc::version();
    match &nvrtc_version {
        Ok((major, minor)) => say!("nvrtc       {major}.{minor}"),
        Err(e) => say!("nvrtc       {e:#}"),
    }
    match nvrtc::cache_dir() {
        Some(dir) => {
            let modules = std::fs::read_dir(&dir)
                .map(|d| {
                    d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "cubin"))).count()
                })
                .unwrap_or(0);
            say!("cache       {} ({modules} compiled modules)", dir.display());
        }
        None => say!("cache       none (no HOME, XDG_CACHE_HOME or WEMOE_CACHE_DIR)"),
    }
    let hub = HubCache::from_env();
    match (hub.dir(), hub.holdings()) {
        (Some(dir), Some((models, datasets))) => {
            let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            let held = format!("{}, {}", count(models, "model"), count(datasets, "dataset"));
            say!("hf cache    {} ({held}: Hub names resolve here)", dir.display())
        }
        (Some(dir), None) => say!("hf cache    {} (absent: Hub names have nothing to resolve to)", dir.display()),
        (None, _) => say!("hf cache    none (no HF_HUB_CACHE, HF_HOME or HOME)"),
    }
    let sources = kernels::sources().count();
    let arch = arch.map(str::to_string).or(device_arch).unwrap_or_else(|| "sm_90".to_string());
    let w = KERNEL_FUNCTIONS.iter().map(|f| f.name.len()).max().unwrap_or(0).max("function".len());
    if nvrtc_version.is_err() {
        say!("kernels     {sources} sources, {} functions (not compiled: no NVRTC)", KERNEL_FUNCTIONS.len());
        for f in KERNEL_FUNCTIONS {
            say!("  {:<w$} {}.cu", f.name, f.source);
        }
        return Ok(());
    }
    say!("kernels     {sources} sources, {} functions, compiled for {arch}:", KERNEL_FUNCTIONS.len());
    say!("  {:<w$} {:>9} {:>10} {:>11} {:>12}", "function", "registers", "smem bytes", "stack bytes", "spills (B)");
    let mut failures = 0;
    for source in kernels::sources() {
        if let Some(why) = source.unsupported_on(&arch) {
            say!("  {why}: not compiled");
            continue;
        }
        match nvrtc::compile(source, &arch) {
            Err(e) => {
                failures += 1;
                say!("  {}: {e:#}", source.file);
            }
            Ok(c) => {
                for f in KERNEL_FUNCTIONS.iter().filter(|f| f.source == source.name) {
                    match c.resources.iter().find(|r| r.function == f.name) {
                        Some(r) => say!(
                            "  {:<w$} {:>9} {:>10} {:>11} {:>12}",
                            f.name,
                            r.registers,
                            r.shared_bytes,
                            r.stack_bytes,
                            format!("{}/{}", r.spill_stores, r.spill_loads)
                        ),
                        None => say!("  {:<w$} (no ptxas report)", f.name),
                    }
                }
            }
        }
    }
    anyhow::ensure!(failures == 0, "{failures} kernel source(s) failed to compile for {arch}");
    Ok(())
}
