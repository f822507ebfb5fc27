//! `wemoe-engine doctor`: what the engine sees.

use anyhow::{ensure, Result};
use wemoe_engine::device::{Backend, CpuBackend, CUDA_UNAVAILABLE};
use wemoe_engine::kernels::KERNELS;

pub fn run(arch: Option<&str>) -> Result<()> {
    if let Some(a) = arch {
        let digits = a.strip_prefix("sm_").unwrap_or("");
        ensure!(
            !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()),
            "--arch '{a}': expected sm_XY, e.g. sm_90"
        );
    }
    println!("wemoe-engine {}", env!("CARGO_PKG_VERSION"));
    println!("cpu         {}", CpuBackend::new().describe());
    println!("cuda        {CUDA_UNAVAILABLE}");
    println!("kernels     {} CUDA sources embedded", KERNELS.len());
    for k in KERNELS {
        println!("  {:<24} {:016x}", k.name, k.hash);
    }
    if let Some(a) = arch {
        println!("compile     {a}: not possible without the CUDA backend");
    }
    Ok(())
}
