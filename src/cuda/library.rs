//! Finding libnvrtc and libcuda at run time without ever panicking. cudarc (with `dynamic-loading`) panics
//! when a library is missing, so every first touch goes through here and absence becomes an error that
//! says what was looked for.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

/// Environment variable naming libnvrtc's file (or the folder holding it) when it is not on the loader's path.
pub const NVRTC_ENV: &str = "WEMOE_NVRTC";

/// Makes libnvrtc loadable by cudarc, once: a file or folder named by `WEMOE_NVRTC` is opened by path and
/// kept open, so cudarc's later open by name finds it; otherwise the loader's own search must find it.
pub fn nvrtc() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE.get_or_init(|| load_nvrtc().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn load_nvrtc() -> Result<()> {
    if let Ok(named) = std::env::var(NVRTC_ENV) {
        let path = PathBuf::from(&named);
        let dir = if path.is_dir() { path.clone() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
        let file = if path.is_dir() { find_in(&dir, "libnvrtc.so.")? } else { path.clone() };
        // NVRTC opens its builtins library by name at compile time: open it first, by path, where it is.
        if let Ok(builtins) = find_in(&dir, "libnvrtc-builtins.so.") {
            keep_open(&builtins)?;
        }
        keep_open(&file).map_err(|e| anyhow!("{NVRTC_ENV}={named}: {e:#}"))?;
    }
    // SAFETY: is_culib_present only tries to dlopen the candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        bail!(
            "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`, then put its \
             lib folder on LD_LIBRARY_PATH or name it in {NVRTC_ENV}"
        )
    }
}

/// Whether a CUDA driver library can be loaded (says nothing about devices).
pub fn driver() -> Result<()> {
    // SAFETY: as above, only dlopen attempts.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        bail!("no CUDA driver (libcuda.so) on this machine")
    }
}

fn find_in(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    found.sort();
    found.pop().ok_or_else(|| anyhow!("no {prefix}* in {}", dir.display()))
}

fn keep_open(path: &Path) -> Result<()> {
    // SAFETY: loading a shared library runs its initialisers; libnvrtc's are benign. It stays loaded for
    // the life of the process, as cudarc's own handle does.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
    std::mem::forget(lib);
    Ok(())
}
