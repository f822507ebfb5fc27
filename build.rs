//! Embeds every `kernels/*.cu` as (name, source, FNV-1a hash) in `$OUT_DIR/kernels.rs`.

use std::fmt::Write as _;
use std::path::Path;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    let mut sources: Vec<_> = std::fs::read_dir("kernels")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    let mut table = String::from("/// Every kernel source, sorted by name.\npub const KERNELS: &[KernelSource] = &[\n");
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read(path).expect("kernel source is readable");
        let name = path.file_stem().unwrap().to_string_lossy();
        let abs = std::fs::canonicalize(path).expect("kernel path resolves");
        writeln!(
            table,
            "    KernelSource {{ name: {name:?}, source: include_str!({abs:?}), hash: 0x{:016x} }},",
            fnv1a(&text)
        )
        .unwrap();
    }
    table.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernels.rs");
    std::fs::write(out, table).unwrap();
}
