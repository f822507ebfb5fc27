//! Seeded corruptions of each kind of file the engine reads (safetensors, PyTorch's zip with its pickle, JPEG,
//! PNG, parquet, a model folder's JSON files and shards, a tokenizer's vocabulary and merges, heads): each
//! corrupted copy either loads or is refused with an error, and a refused file's error names it (or its model
//! folder); none panics. `bad_input.rs` names each failure a user meets by hand; this covers the damage nobody
//! thought to name: a length field off by a byte, a header cut short, an opcode turned into another.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use anyhow::Result;
use common::fixture;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};
use wemoe_engine::data::{decode_image, Dataset, Preprocess};
use wemoe_engine::device::CpuBackend;
use wemoe_engine::model::{Heads, ImageEncoder, Routing};
use wemoe_engine::tensor::Tensor;
use wemoe_engine::text::ClipTokenizer;

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

/// Where a corrupted copy goes, and what `check` is given.
#[derive(Clone, Copy, PartialEq)]
enum Placement {
    /// The file alone; `check` gets the file.
    Alone,
    /// The file among copies of the other files of its folder (a model directory); `check` gets the folder.
    InItsFolder,
}

/// Runs `check` on `copies` corrupted copies of each fixture in `originals` (seeded by `seed`, so that a rerun
/// makes the same copies), made one by one in a scratch folder, and asserts that none panicked, that each
/// refusal's error names what `check` was given, and that at least `least_refused` copies of each fixture were
/// refused (else the corruptions would not be reaching the parsers).
fn each_copy_loads_or_is_refused(
    seed: u64,
    originals: &[&str],
    placement: Placement,
    (copies, least_refused): (usize, usize),
    check: impl Fn(&Path) -> Result<()>,
) {
    let scratch = tempfile::tempdir().unwrap();
    let mut corrupter = Corrupter(seed);
    for original in originals {
        let original_path = fixture(original);
        let bytes = std::fs::read(&original_path).unwrap();
        let (mut panicked, mut refused) = (Vec::new(), 0);
        for copy in 0..copies {
            let folder = scratch.path().join(format!("copy-{copy}"));
            match placement {
                Placement::Alone => std::fs::create_dir(&folder).unwrap(),
                Placement::InItsFolder => copy_files(original_path.parent().unwrap(), &folder),
            }
            let corrupted = folder.join(original_path.file_name().unwrap());
            std::fs::write(&corrupted, corrupter.corrupt(&bytes)).unwrap();
            let given = if placement == Placement::Alone { &corrupted } else { &folder };
            match catch_unwind(AssertUnwindSafe(|| check(given))) {
                Err(_) => panicked.push(copy),
                Ok(Err(e)) => {
                    refused += 1;
                    let message = format!("{e:#}");
                    assert!(message.contains(&given.display().to_string()), "{original}, copy {copy}: {message}");
                }
                Ok(Ok(())) => {}
            }
            std::fs::remove_dir_all(&folder).unwrap();
        }
        assert!(panicked.is_empty(), "{original}: copies {panicked:?} of {copies} panicked");
        assert!(refused >= least_refused, "{original}: only {refused} of {copies} corrupted copies were refused");
    }
}

/// Copies the files (not the folders) of `from` into a new folder `to`.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
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
    each_copy_loads_or_is_refused(
        0x9e37_79b9_7f4a_7c15,
        &originals,
        Placement::Alone,
        (COPIES, COPIES / 4),
        read_every_tensor,
    );
}

#[test]
fn corrupted_images_decode_or_are_refused() {
    let originals = [
        "photos/class_0/china_301x217.jpg",
        "photos/class_0/flower_121x143.png",
        "photos/class_1/flower_grey_97x65.png",
    ];
    // `decode_image` takes bytes and cannot name a file: the path is added here, so this test checks no panic.
    let decode = |path: &Path| -> Result<()> {
        decode_image(&std::fs::read(path)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(())
    };
    each_copy_loads_or_is_refused(0x2545_f491_4f6c_dd1d, &originals, Placement::Alone, (COPIES, COPIES / 10), decode);
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
    each_copy_loads_or_is_refused(0x6a09_e667_f3bc_c908, &originals, Placement::Alone, (COPIES / 4, COPIES / 16), read);
}

#[test]
fn corrupted_model_folders_load_and_run_or_are_refused_naming_the_folder() {
    let be = CpuBackend::new();
    let load_and_run = |folder: &Path| -> Result<()> {
        let model = ModelDir::open(folder)?;
        let encoder = ImageEncoder::load(&be, &model)?;
        let side = model.config.image_size;
        // The preprocessing the folder asks for, on a 37 × 23 RGB image.
        let image: Vec<u8> = (0..37 * 23 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let preprocessed = Preprocess::for_model(folder, side)?.apply(&image, 23, 37, 3)?;
        let pixels = Tensor::from_vec(&[1, 3, side, side], preprocessed)?;
        encoder.encode(&be, &pixels, Routing::Sample)?;
        let pixels = Tensor::from_vec(&[2, 3, side, side], vec![0.1; 2 * 3 * side * side])?;
        encoder.encode(&be, &pixels, Routing::Sample)?;
        encoder.encode(&be, &pixels, Routing::Batch)?;
        Ok(())
    };
    let originals = [
        "clip_a/config.json",
        "clip_a/model.safetensors.index.json",
        "clip_a/preprocessor_config.json",
        "clip_a/model-00001-of-00005.safetensors",
        "clip_c/config.json",
        "wemoe/fusionbench_d2/config.json",
        "wemoe/fusionbench_d2/model.safetensors",
    ];
    // A damaged preprocessor_config.json may still parse; a damaged config.json or index nearly never does.
    each_copy_loads_or_is_refused(
        0xbb67_ae85_84ca_a73b,
        &originals,
        Placement::InItsFolder,
        (COPIES / 4, 1),
        load_and_run,
    );
}

#[test]
fn corrupted_tokenizers_and_heads_load_or_are_refused_naming_the_file() {
    let tokenize = |folder: &Path| -> Result<()> {
        let tokenizer = ClipTokenizer::open(folder)?;
        for prompt in ["a photo of a cat.", "naïve café, 123 — 🐱", "", "   x  "] {
            tokenizer.encode(prompt)?;
        }
        Ok(())
    };
    let originals = ["heads_tool/clip/vocab.json", "heads_tool/clip/merges.txt"];
    each_copy_loads_or_is_refused(0x3c6e_f372_fe94_f82b, &originals, Placement::InItsFolder, (COPIES / 4, 1), tokenize);

    let be = CpuBackend::new();
    let read_heads = |path: &Path| -> Result<()> {
        let heads = Heads::open(&be, path)?;
        let tasks: Vec<String> = heads.task_names().map(str::to_string).collect();
        for task in &tasks {
            heads.head(task)?;
        }
        Ok(())
    };
    let originals = ["heads_tool/heads.safetensors", "heads_a.safetensors"];
    each_copy_loads_or_is_refused(
        0xa54f_f53a_5f1d_36f1,
        &originals,
        Placement::Alone,
        (COPIES / 4, COPIES / 16),
        read_heads,
    );
}
