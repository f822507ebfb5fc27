//! Every kernel source compiles with NVRTC to an sm_90 CUBIN, with ptxas' resources per kernel function;
//! compile errors name the kernel and carry NVRTC's log; the on-disk cache answers the second time.
//! NVRTC must be loadable (`. tools/nvrtc-env.sh` installs it from PyPI, as CI does): if it is not, these tests
//! fail, they are not skipped.

use wemoe_engine::cuda::nvrtc;
use wemoe_engine::kernels::{self, KernelSource, KERNEL_FUNCTIONS};

const ARCH: &str = "sm_90";

/// A private cache folder in `WEMOE_CACHE_DIR`, for one test at a time: the variable is the process's, and a
/// test running beside would point it elsewhere between two compiles.
struct FreshCache {
    _dir: tempfile::TempDir,
    _alone: std::sync::MutexGuard<'static, ()>,
}

fn with_fresh_cache() -> FreshCache {
    static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let alone = ENVIRONMENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // SAFETY (of the test): the tests that read or write the environment hold the lock above.
    unsafe { std::env::set_var("WEMOE_CACHE_DIR", dir.path()) };
    FreshCache { _dir: dir, _alone: alone }
}

#[test]
fn every_kernel_compiles_to_a_cubin_with_its_resources() {
    let _cache = with_fresh_cache();
    let (major, minor) =
        nvrtc::version().expect("NVRTC must be loadable: run `. tools/nvrtc-env.sh` first, or set WEMOE_NVRTC");
    println!("NVRTC {major}.{minor}, {ARCH}");
    println!("{:<36} {:>5} {:>7} {:>7} {:>6} {:>6}", "kernel", "regs", "smem", "stack", "spillS", "spillL");
    let mut seen = 0;
    for source in kernels::sources() {
        let compiled = nvrtc::compile(source, ARCH).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!compiled.from_cache);
        assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{}: not a CUBIN (ELF) image", source.file);
        for f in KERNEL_FUNCTIONS.iter().filter(|f| f.source == source.name) {
            let r = compiled
                .resources
                .iter()
                .find(|r| r.function == f.name)
                .unwrap_or_else(|| panic!("{}: no ptxas report for {} in:\n{}", source.file, f.name, compiled.log));
            println!(
                "{:<36} {:>5} {:>7} {:>7} {:>6} {:>6}",
                f.name, r.registers, r.shared_bytes, r.stack_bytes, r.spill_stores, r.spill_loads
            );
            assert!(r.registers > 0, "{}: no registers reported", f.name);
            assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{} spills registers to local memory", f.name);
            // A stack frame means a register array indexed at run time went to local memory.
            assert_eq!(r.stack_bytes, 0, "{} has a {}-byte stack frame", f.name, r.stack_bytes);
            seen += 1;
        }
    }
    assert_eq!(seen, KERNEL_FUNCTIONS.len(), "every kernel function was compiled and reported");
}

#[test]
fn a_compile_error_names_the_kernel_and_carries_the_log() {
    let _cache = with_fresh_cache();
    let bad = KernelSource {
        name: "broken",
        file: "broken.cu",
        header: false,
        source: "extern \"C\" __global__ void k(float* y) { y[0] = undeclared_thing; }\n",
        hash: 1,
        min_arch: 0,
        needs: "",
    };
    let err = format!("{:#}", nvrtc::compile(&bad, ARCH).unwrap_err());
    assert!(err.contains("broken.cu"), "{err}");
    assert!(err.contains("undeclared_thing"), "NVRTC's log is carried: {err}");
    let err = format!("{:#}", nvrtc::compile(&bad, "90").unwrap_err());
    assert!(err.contains("sm_XY"), "{err}");
}

#[test]
fn an_architecture_nvrtc_cannot_compile_for_is_named_with_its_list() {
    let _cache = with_fresh_cache();
    let archs = nvrtc::supported_archs().unwrap();
    assert!(archs.contains(&90) && archs.windows(2).all(|w| w[0] < w[1]), "{archs:?}");
    let source = kernels::sources().next().unwrap();
    let err = format!("{:#}", nvrtc::compile(source, "sm_1000").unwrap_err());
    let (major, minor) = nvrtc::version().unwrap();
    let want = format!("architecture 'sm_1000': NVRTC {major}.{minor} compiles for sm_{}", archs[0]);
    assert!(err.starts_with(&want) && err.contains(", sm_90,") && err.lines().count() == 1, "{err}");
    nvrtc::check_supported("sm_90a").unwrap();
}

#[test]
fn the_cache_answers_the_second_compile_with_the_same_image() {
    let _cache = with_fresh_cache();
    let source = kernels::sources().find(|s| s.name == "elementwise").unwrap();
    let first = nvrtc::compile(source, ARCH).unwrap();
    let second = nvrtc::compile(source, ARCH).unwrap();
    assert!(!first.from_cache && second.from_cache);
    assert_eq!(first.cubin, second.cubin);
    assert_eq!(first.resources, second.resources);
    assert!(second.cached_at.unwrap().to_string_lossy().contains(ARCH));
}

#[test]
fn a_damaged_cache_entry_is_replaced_by_a_recompile() {
    // The cache trusts what it holds (the GPU executor finds a damaged CUBIN when the driver refuses it); a
    // recompile then writes a good one in its place, which the next compile reads.
    let _cache = with_fresh_cache();
    let source = kernels::sources().find(|s| s.name == "adam").unwrap();
    let good = nvrtc::compile(source, ARCH).unwrap();
    std::fs::write(good.cached_at.as_ref().unwrap(), b"not a cubin").unwrap();
    let damaged = nvrtc::compile(source, ARCH).unwrap();
    assert!(damaged.from_cache && damaged.cubin == b"not a cubin");
    let again = nvrtc::recompile(source, ARCH).unwrap();
    assert!(!again.from_cache && again.cubin.starts_with(b"\x7fELF"));
    assert_eq!(again.cached_at, good.cached_at);
    let read = nvrtc::compile(source, ARCH).unwrap();
    assert!(read.from_cache && read.cubin == again.cubin);
}

/// The sources whose `// needs sm_XY` line names a newer architecture than the oldest NVRTC compiles for (sm_75
/// for NVRTC 13: Turing, a T4) are refused there in one line, and need that line: without it NVRTC fails on
/// them. Every other source compiles there, and the marked ones compile for the architecture they name.
#[test]
fn sources_that_need_a_newer_architecture_say_so_and_the_rest_compile_for_the_oldest() {
    let _cache = with_fresh_cache();
    let oldest = format!("sm_{}", nvrtc::supported_archs().unwrap()[0]);
    let mut marked = Vec::new();
    for source in kernels::sources() {
        let Some(why) = source.unsupported_on(&oldest) else {
            nvrtc::compile(source, &oldest).unwrap_or_else(|e| panic!("{e:#}"));
            continue;
        };
        let err = format!("{:#}", nvrtc::compile(source, &oldest).unwrap_err());
        assert_eq!(err, format!("kernel {why}"));
        let unmarked = KernelSource { min_arch: 0, ..*source };
        let log = match nvrtc::compile(&unmarked, &oldest) {
            Ok(_) => panic!(
                "{} compiles for {oldest}: its `// needs sm_{}` line is not needed",
                source.file, source.min_arch
            ),
            Err(e) => format!("{e:#}"),
        };
        assert!(log.contains("failed to compile") && log.contains(source.file), "{log}");
        nvrtc::compile(source, &format!("sm_{}", source.min_arch)).unwrap_or_else(|e| panic!("{e:#}"));
        marked.push(source.name);
    }
    if oldest == "sm_75" {
        let want = ["copy_async_probe", "expert_linear_mma", "expert_linear_staged", "expert_linear_wide"];
        assert_eq!(marked, want);
    }
}
