//! Seeded corruptions of each kind of file the engine reads (safetensors, PyTorch's zip with its pickle, JPEG,
//! PNG, parquet): each corrupted copy either loads or is refused with an error, and a refused file's error names
//! it; none panics. `bad_input.rs` names each failure a user meets by hand; this covers the damage nobody
//! thought to name: a length field off by a byte, a header cut short, an opcode turned into another.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use anyhow::Result;
use common::fixture;
use wemoe_engine::checkpoint::SafetensorsFile;
use wemoe_engine::data::{decode_image, Dataset, Preprocess};

/// Corrupted copies of each file.
const COPIES: usize = 200;

/// xorshift64: the same corruptions on every run, so that a failure reproduces.
struct Corrupter(u64);

impl Corrupter {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// `bytes` cut at a random length (one copy in four), else with one to four bytes overwritten, half of
    /// them in the first 512 bytes, where the headers and their length fields are.
    fn corrupt(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut copy = bytes.to_vec();
        if self.below(4) == 0 {
            copy.truncate(self.below(bytes.len()));
            return copy;
        }
        for _ in 0..1 + self.below(4) {
            let span = if self.below(2) == 0 { copy.len().min(512) } else { copy.len() };
            let at = self.below(span);
            copy[at] = match self.below(4) {
                0 => 0,
                1 => 0xff,
                2 => copy[at].wrapping_add(1),
                _ => self.next() as u8,
            };
        }
        copy
    }
}

/// Opens a tensor file as the engine does and reads every tensor in each way it is read.
fn read_every_tensor(path: &Path) -> Result<()> {
    let file = SafetensorsFile::open_any(path)?;
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in &names {
        // A tensor may be refused in one reading and not another (u8 pixels as f32); what matters is no panic.
        let _ = file.f32(name);
        let _ = file.integers(name);
        let _ = file.u8(name);
    }
    Ok(())
}

/// Runs `check` on `copies` corrupted copies of each fixture in `originals` (seeded by `seed`, so that a rerun
/// makes the same copies), written into a scratch folder one by one, and asserts that none panicked, that each
/// refusal's error names the copy, and that at least `least_refused` copies of each fixture were refused (else
/// the corruptions would not be reaching the parsers).
fn each_copy_loads_or_is_refused(
    seed: u64,
    originals: &[&str],
    copies: usize,
    least_refused: usize,
    check: impl Fn(&Path) -> Result<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut corrupter = Corrupter(seed);
    for original in originals {
        let bytes = std::fs::read(fixture(original)).unwrap();
        let name = Path::new(original).file_name().unwrap().to_string_lossy();
        let (mut panicked, mut refused) = (Vec::new(), 0);
        for copy in 0..copies {
            let path = dir.path().join(format!("{copy}-{name}"));
            std::fs::write(&path, corrupter.corrupt(&bytes)).unwrap();
            match catch_unwind(AssertUnwindSafe(|| check(&path))) {
                Err(_) => panicked.push(copy),
                Ok(Err(e)) => {
                    refused += 1;
                    let message = format!("{e:#}");
                    assert!(message.contains(&path.display().to_string()), "{original}, copy {copy}: {message}");
                }
                Ok(Ok(())) => {}
            }
            std::fs::remove_file(&path).unwrap();
        }
        assert!(panicked.is_empty(), "{original}: copies {panicked:?} of {copies} panicked");
        assert!(refused >= least_refused, "{original}: only {refused} of {copies} corrupted copies were refused");
    }
}

#[test]
fn corrupted_tensor_files_load_or_are_refused_naming_the_file() {
    let originals = [
        "pickle/clip_c/pytorch_model.bin",
        "pickle/clip_b_sharded/pytorch_model-00001-of-00002.bin",
        "pixels_a.safetensors",
        "heads_a.safetensors",
        "images_u8.safetensors",
    ];
    // Most damage is caught as the file opens; a copy whose damage lies in its values loads.
    each_copy_loads_or_is_refused(0x9e37_79b9_7f4a_7c15, &originals, COPIES, COPIES / 4, read_every_tensor);
}

#[test]
fn corrupted_images_decode_or_are_refused() {
    let originals = [
        "photos/class_0/china_301x217.jpg",
        "photos/class_0/flower_121x143.png",
        "photos/class_1/flower_grey_97x65.png",
    ];
    let decode = |path: &Path| -> Result<()> {
        decode_image(&std::fs::read(path)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(())
    };
    each_copy_loads_or_is_refused(0x2545_f491_4f6c_dd1d, &originals, COPIES, COPIES / 10, decode);
}

#[test]
fn corrupted_parquet_datasets_load_or_are_refused_naming_the_file() {
    let preprocess = Preprocess::clip(32);
    let read = |path: &Path| -> Result<()> {
        let data = Dataset::open(path, &preprocess, 32)?;
        for row in 0..data.len() {
            data.batch(row..row + 1)?;
        }
        Ok(())
    };
    let originals = ["parquet/by_name.parquet", "parquet/path_only.parquet"];
    each_copy_loads_or_is_refused(0x6a09_e667_f3bc_c908, &originals, COPIES / 4, COPIES / 16, read);
}
