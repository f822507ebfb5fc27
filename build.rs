//! Build script:
//! - embeds every `kernels/*.cu` and `kernels/*.cuh` as (name, source, FNV-1a hash) in `$OUT_DIR/kernels.rs`,
//!   with the signature of each `extern "C" __global__` function, so launches are checked against it;
//! - compiles each `.cu` as C++ with `kernels/host/cuda_host.h`, plus one host launcher per kernel, into a
//!   static library: the host emulation that runs every kernel in `cargo test` without a GPU.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// One `extern "C" __global__` function: its name and its parameters' (C type, name).
struct Kernel {
    name: String,
    params: Vec<(String, String)>,
}

/// Finds the kernels of one source. Parameters are `type name` with `__restrict__` ignored.
fn kernels_of(text: &str, file: &Path) -> Vec<Kernel> {
    const MARK: &str = "extern \"C\" __global__ void";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let mut s = rest[at + MARK.len()..].trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            let close = after.find(')').unwrap_or_else(|| panic!("{}: unclosed __launch_bounds__", file.display()));
            s = after[close + 1..].trim_start();
        }
        let open = s.find('(').unwrap();
        let name = s[..open].trim().to_string();
        let close = s.find(')').unwrap_or_else(|| panic!("{}: kernel {name}: unclosed parameter list", file.display()));
        let params = s[open + 1..close]
            .split(',')
            .map(|p| {
                let p = p.replace("__restrict__", " ");
                let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                let split = p
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or_else(|| panic!("{}: kernel {name}: parameter '{p}' has no type", file.display()));
                (p[..=split].trim().to_string(), p[split + 1..].to_string())
            })
            .collect();
        out.push(Kernel { name, params });
        rest = &s[close..];
    }
    out
}

/// The Rust `ParamKind` of a C parameter type.
fn param_kind(c_type: &str, kernel: &str) -> &'static str {
    match c_type {
        "const float*" => "ParamKind::ConstF32Ptr",
        "float*" => "ParamKind::F32Ptr",
        "int" => "ParamKind::I32",
        "float" => "ParamKind::F32",
        "double" => "ParamKind::F64",
        other => panic!("kernel {kernel}: parameter type '{other}' is not one the launcher knows"),
    }
}

/// A source's `// needs sm_XY: WHAT` line (the oldest architecture it compiles for, and the feature that sets it),
/// or (0, "") where any architecture NVRTC offers will do.
fn needs_of(text: &str, file: &Path) -> (u32, String) {
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("// needs sm_")) else { return (0, String::new()) };
    let (arch, what) =
        line.split_once(": ").unwrap_or_else(|| panic!("{}: expected `// needs sm_XY: WHAT`", file.display()));
    let arch = arch.parse().unwrap_or_else(|_| panic!("{}: `// needs sm_{arch}`: not a number", file.display()));
    (arch, what.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"));
    files.sort();

    let mut sources = String::from(
        "/// Every kernel source and header, sorted by file name.\npub const KERNELS: &[KernelSource] = &[\n",
    );
    let mut functions = String::from(
        "/// Every kernel function, with its parameters.\npub const KERNEL_FUNCTIONS: &[KernelFunction] = &[\n",
    );
    let mut host_decls = String::from("unsafe extern \"C\" {\n");
    let mut host_table = String::from("/// The host-emulation launcher of each kernel function.\npub(crate) const HOST_LAUNCHERS: &[(&str, HostLauncher)] = &[\n");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .flag("-include")
        .flag(Path::new("kernels/host/cuda_host.h").canonicalize().unwrap().to_str().unwrap())
        .flag_if_supported("-Wno-unknown-pragmas")
        .file("kernels/host/cuda_host.cpp")
        .include("kernels");
    println!("cargo:rerun-if-changed=kernels/host");

    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(path).expect("kernel source is readable");
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let file_name = path.file_name().unwrap().to_string_lossy().to_string();
        let abs = std::fs::canonicalize(path).expect("kernel path resolves");
        let is_header = path.extension().is_some_and(|e| e == "cuh");
        let (min_arch, needs) = needs_of(&text, path);
        writeln!(
            sources,
            "    KernelSource {{ name: {stem:?}, file: {file_name:?}, header: {is_header}, source: include_str!({abs:?}), hash: 0x{:016x}, min_arch: {min_arch}, needs: {needs:?} }},",
            fnv1a(text.as_bytes())
        )
        .unwrap();
        if is_header {
            continue;
        }
        let mut launcher = format!("#include {:?}\n\n", abs.to_str().unwrap());
        for k in kernels_of(&text, path) {
            let kinds: Vec<_> = k.params.iter().map(|(t, _)| param_kind(t, &k.name)).collect();
            writeln!(
                functions,
                "    KernelFunction {{ source: {stem:?}, name: {:?}, params: &[{}], param_names: &[{}] }},",
                k.name,
                kinds.join(", "),
                k.params.iter().map(|(_, n)| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            )
            .unwrap();
            let host = format!("wemoe_host_{}", k.name);
            writeln!(launcher, "extern \"C\" void {host}(const unsigned* dims, void** args) {{").unwrap();
            for (i, (t, _)) in k.params.iter().enumerate() {
                writeln!(launcher, "    {t} a{i} = *static_cast<{t}*>(args[{i}]);").unwrap();
            }
            let call: Vec<_> = (0..k.params.len()).map(|i| format!("a{i}")).collect();
            writeln!(
                launcher,
                "    cuda_host::launch(dim3{{dims[0], dims[1], dims[2]}}, dim3{{dims[3], dims[4], dims[5]}}, cuda_host::CopyLanding(dims[6]), [&] {{ {}({}); }});\n}}\n",
                k.name,
                call.join(", ")
            )
            .unwrap();
            writeln!(host_decls, "    fn {host}(dims: *const u32, args: *const *mut std::ffi::c_void);").unwrap();
            writeln!(host_table, "    ({:?}, {host}),", k.name).unwrap();
        }
        let launcher_path = out_dir.join(format!("host_{stem}.cpp"));
        std::fs::write(&launcher_path, launcher).unwrap();
        build.file(launcher_path);
    }
    sources.push_str("];\n");
    functions.push_str("];\n");
    host_decls.push_str("}\n");
    host_table.push_str("];\n");
    std::fs::write(out_dir.join("kernels.rs"), sources + &functions).unwrap();
    std::fs::write(out_dir.join("host_kernels.rs"), host_decls + &host_table).unwrap();
    build.compile("wemoe_host_kernels");
}
