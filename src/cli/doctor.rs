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
    say!("wemoe-engine {}", env!("CARGO_PKG_VERSION"));
    say!("cpu         {}", CpuBackend::new().describe());
    say!("cuda        {CUDA_UNAVAILABLE}");
    say!("kernels     {} CUDA sources embedded", KERNELS.len());
    for k in KERNELS {
        say!("  {:<24} {:016x}", k.name, k.hash);
    }
    if let Some(a) = arch {
        say!("compile     {a}: not possible without the CUDA backend");
    }
    Ok(())
}
