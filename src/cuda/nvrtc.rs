//! Run-time compilation of `kernels/*.cu` by NVRTC to a CUBIN for one architecture (never PTX: a driver
//! older than the NVRTC will not load its PTX), cached on disk by (source and header hash, architecture,
//! NVRTC version), with ptxas' resource report (registers, spills, shared memory) per kernel function.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::nvrtc::sys;

use crate::kernels::{self, KernelSource};

/// NVRTC's version, e.g. (13, 0).
pub fn version() -> Result<(i32, i32)> {
    super::library::nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the out-pointers are valid.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    check(rc, "nvrtcVersion")?;
    Ok((major, minor))
}

/// What ptxas reports for one kernel function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// The function's name.
    pub function: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Stack frame per thread, bytes.
    pub stack_bytes: u32,
    /// Bytes spilled to local memory (stores).
    pub spill_stores: u32,
    /// Bytes reloaded from local memory.
    pub spill_loads: u32,
}

/// One source compiled for one architecture.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (with ptxas' report).
    pub log: String,
    /// ptxas' report per kernel function.
    pub resources: Vec<Resources>,
    /// Where the cached copy lies, if the cache is writable.
    pub cached_at: Option<PathBuf>,
    /// Whether it came from the cache.
    pub from_cache: bool,
}

/// The folder of compiled modules: `$WEMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/wemoe-engine/kernels`, else
/// `~/.cache/wemoe-engine/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WEMOE_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wemoe-engine").join("kernels"))
}

/// Checks an architecture name: `sm_` followed by digits (and an optional `a` suffix).
pub fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("sm_").unwrap_or("");
    let digits = digits.strip_suffix('a').unwrap_or(digits);
    if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
        bail!("architecture '{arch}': expected sm_XY, e.g. sm_90");
    }
    Ok(())
}

/// The architectures this NVRTC compiles for, as numbers (90 for sm_90), in its order (ascending).
pub fn supported_archs() -> Result<Vec<i32>> {
    let (major, minor) = version()?;
    // Before 11.2 the functions used here and for CUBINs are not all there, and cudarc's loader would panic on
    // a missing symbol.
    ensure!(
        (major, minor) >= (11, 2),
        "NVRTC {major}.{minor} is older than 11.2, the oldest the engine can use (install a newer one, e.g. the \
         PyPI wheel nvidia-cuda-nvrtc, and name it in WEMOE_NVRTC)"
    );
    let mut count = 0;
    // SAFETY: the library is loaded (`version` loaded it) and has the function; the out-pointer is valid.
    check(unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) }, "nvrtcGetNumSupportedArchs")?;
    let mut archs = vec![0; count.max(0) as usize];
    // SAFETY: `archs` holds the `count` entries NVRTC writes.
    check(unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }, "nvrtcGetSupportedArchs")?;
    Ok(archs)
}

/// Checks that this NVRTC compiles for `arch`: a card newer than the NVRTC, or a mistyped `--arch`, is named
/// once with the list, not as an invalid option in every kernel's log.
pub fn check_supported(arch: &str) -> Result<()> {
    check_arch(arch)?;
    let number: i32 = arch["sm_".len()..].trim_end_matches('a').parse().expect("checked digits");
    let archs = supported_archs()?;
    if !archs.contains(&number) {
        let (major, minor) = version()?;
        let list: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
        bail!("architecture '{arch}': NVRTC {major}.{minor} compiles for {} only", list.join(", "));
    }
    Ok(())
}

/// Compiles `source` for `arch`, or reads it from the cache.
pub fn compile(source: &KernelSource, arch: &str) -> Result<Compiled> {
    let key = cache_key(source, arch)?;
    check_min_arch(source, arch)?;
    let cache = cache_dir();
    if let Some(dir) = &cache {
        let (cubin_path, log_path) = (dir.join(format!("{key}.cubin")), dir.join(format!("{key}.log")));
        if let (Ok(cubin), Ok(log)) = (std::fs::read(&cubin_path), std::fs::read_to_string(&log_path)) {
            if !cubin.is_empty() {
                let resources = parse_resources(&log);
                return Ok(Compiled { cubin, log, resources, cached_at: Some(cubin_path), from_cache: true });
            }
        }
    }
    compile_and_store(source, arch, &key, cache)
}

/// Compiles `source` for `arch` afresh, replacing its cache entry: for a cached CUBIN that the driver refuses
/// (damaged on disk since it was written).
pub fn recompile(source: &KernelSource, arch: &str) -> Result<Compiled> {
    check_min_arch(source, arch)?;
    compile_and_store(source, arch, &cache_key(source, arch)?, cache_dir())
}

/// Refuses a source on an architecture older than its `// needs sm_XY` line names, in one line rather than as
/// ptxas' list of every instruction the architecture lacks.
fn check_min_arch(source: &KernelSource, arch: &str) -> Result<()> {
    match source.unsupported_on(arch) {
        Some(why) => bail!("kernel {why}"),
        None => Ok(()),
    }
}

/// A compiled module's name in the cache: its source, the source's hash, the architecture, NVRTC's version.
fn cache_key(source: &KernelSource, arch: &str) -> Result<String> {
    check_arch(arch)?;
    let (major, minor) = version()?;
    Ok(format!("{}-{:016x}-{arch}-nvrtc{major}.{minor}", source.name, kernels::source_key(source)))
}

fn compile_and_store(source: &KernelSource, arch: &str, key: &str, cache: Option<PathBuf>) -> Result<Compiled> {
    check_supported(arch)?;
    let (cubin, log) = compile_uncached(source, arch)?;
    let resources = parse_resources(&log);
    let cached_at = cache.and_then(|dir| store(&dir, key, &cubin, &log).ok());
    Ok(Compiled { cubin, log, resources, cached_at, from_cache: false })
}

fn store(dir: &Path, key: &str, cubin: &[u8], log: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let cubin_path = dir.join(format!("{key}.cubin"));
    crate::output::write_atomic(&dir.join(format!("{key}.log")), log.as_bytes())?;
    crate::output::write_atomic(&cubin_path, cubin)?;
    Ok(cubin_path)
}

fn check(rc: sys::nvrtcResult, what: &str) -> Result<()> {
    if rc == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        bail!("{what} failed: {rc:?}")
    }
}

fn compile_uncached(source: &KernelSource, arch: &str) -> Result<(Vec<u8>, String)> {
    let src = CString::new(source.source).context("kernel source holds a NUL byte")?;
    let name = CString::new(source.file).unwrap();
    let headers: Vec<(CString, CString)> =
        kernels::headers().map(|h| (CString::new(h.source).unwrap(), CString::new(h.file).unwrap())).collect();
    let header_texts: Vec<*const c_char> = headers.iter().map(|(t, _)| t.as_ptr()).collect();
    let header_names: Vec<*const c_char> = headers.iter().map(|(_, n)| n.as_ptr()).collect();
    let options: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "--ptxas-options=-v".into(),
        "-DWEMOE_NVRTC=1".into(),
    ]
    .into_iter()
    .map(|o| CString::new(o).unwrap())
    .collect();
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is to a live NUL-terminated string; the counts match the arrays.
    unsafe {
        check(
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                headers.len() as i32,
                header_texts.as_ptr(),
                header_names.as_ptr(),
            ),
            "nvrtcCreateProgram",
        )?;
        let rc = sys::nvrtcCompileProgram(prog, option_ptrs.len() as i32, option_ptrs.as_ptr());
        let log = program_log(prog);
        if rc != sys::nvrtcResult::NVRTC_SUCCESS {
            sys::nvrtcDestroyProgram(&mut prog);
            bail!("kernel {} failed to compile for {arch} ({rc:?}):\n{}", source.file, log.trim_end());
        }
        let mut size = 0usize;
        let rc = sys::nvrtcGetCUBINSize(prog, &mut size);
        let mut cubin = vec![0u8; size];
        let rc2 = if rc == sys::nvrtcResult::NVRTC_SUCCESS {
            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
        } else {
            rc
        };
        sys::nvrtcDestroyProgram(&mut prog);
        check(rc2, "nvrtcGetCUBIN").map_err(|e| anyhow!("kernel {}: {e}", source.file))?;
        Ok((cubin, log))
    }
}

unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: prog is a live program (caller's contract).
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    // SAFETY: buf holds `size` bytes, as NVRTC asked.
    unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) };
    CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Reads ptxas' `-v` report: per function, "Function properties for F", "N bytes stack frame, N bytes spill
/// stores, N bytes spill loads", "Used N registers, ... N bytes smem".
pub fn parse_resources(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(Resources { function: rest.trim().to_string(), ..Default::default() });
        } else if let Some(r) = out.last_mut() {
            if line.contains("stack frame") {
                r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                   ptxas info    : Function properties for k\n    \
                   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 72 registers, used 1 barriers, 8704 bytes smem, 436 bytes cmem[0]\n";
        let r = parse_resources(log);
        assert_eq!(
            r,
            vec![Resources {
                function: "k".into(),
                registers: 72,
                shared_bytes: 8704,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12
            }]
        );
        assert!(check_arch("sm_90").is_ok() && check_arch("sm_90a").is_ok());
        assert!(check_arch("90").is_err() && check_arch("sm_x").is_err());
    }
}
