//! Shared test helpers: fixture paths, reference tensors, and the tolerances, named in one place.
#![allow(dead_code)]

use std::path::PathBuf;

use wemoe_engine::checkpoint::SafetensorsFile;

/// Forward outputs against the reference: max |a − b| / max |b| (DESIGN.md section 6).
pub const FORWARD_REL_TOL: f64 = 1e-4;
/// A CUDA kernel (emulated or on a GPU, exact f32 mode) against the CPU reference: max |a − b| / max |b|.
pub const KERNEL_REL_TOL: f64 = 2e-5;
/// Merged tensors against FusionBench's: |ours − theirs| ≤ this × (1 + |theirs|).
pub const MERGE_TOL: f64 = 1e-6;
/// `--precision tf32` (the forward's products on TF32 tensor cores) against exact f32, a whole model's output.
pub const TF32_REL_TOL: f64 = 5e-3;
/// `--precision bf16` against exact f32, a whole model's output (DESIGN.md section 6: bf16 paths within 2e-2).
pub const BF16_REL_TOL: f64 = 2e-2;
/// `--precision bf16` router gradients against torch's f32 ones: relative L2 of each router tensor. Looser than
/// an output's: the gradient runs through bf16 products forward and back, and a rounding that flips a router
/// unit's ReLU moves that unit's whole row (measured on FusionBench's fixture: at most 3.8e-2, cosine similarity
/// above 0.999 for every tensor; the test prints both).
pub const BF16_GRADIENT_REL_L2_TOL: f64 = 5e-2;
/// Preprocessed pixel values against CLIPImageProcessor: largest absolute difference.
pub const PIXEL_MAX_ABS_TOL: f64 = 1e-2;
/// Preprocessed pixel values against CLIPImageProcessor: mean absolute difference.
pub const PIXEL_MEAN_ABS_TOL: f64 = 2e-3;

/// A file or folder under tests/fixtures (or under `$WEMOE_FIXTURES`, for test binaries run from another
/// copy of the repository, as tools/gpu-check.sh does on a GPU machine).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("WEMOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(name)
}

/// Tensor `name` of fixture file `file` as (shape, values).
pub fn reference(file: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = SafetensorsFile::open(&fixture(file)).unwrap();
    let t = f.f32(name).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    (t.shape().to_vec(), t.host().unwrap().to_vec())
}

/// max |a − b| / max |b|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length differs");
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let scale = want.iter().map(|b| b.abs() as f64).fold(0.0, f64::max);
    diff / scale.max(f64::MIN_POSITIVE)
}

/// Asserts `got` matches `want` within [`FORWARD_REL_TOL`].
pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(e <= FORWARD_REL_TOL, "{what}: relative error {e:.3e} > {FORWARD_REL_TOL:e}");
}

/// The engine binary, run with `args`: (success, stdout, stderr).
pub fn engine(args: &[&str]) -> (bool, String, String) {
    engine_with_env(&[], args)
}

/// [`engine`] with extra environment variables (and without a `WEMOE_OP_TIMES` of the caller's shell, whose
/// table on stderr would break the tests that read it, nor progress lines in its stderr, which a slow machine would
/// otherwise get after a minute).
pub fn engine_with_env(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut command = engine_command();
    command.args(args).env_remove(wemoe_engine::device::op_times::ENV).env("WEMOE_PROGRESS_SECONDS", "86400");
    command.envs(env.iter().copied());
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command that runs the binary under test: directly, or through `$WEMOE_TEST_RUNNER` (a command and
/// its arguments, such as `qemu-aarch64 -L /usr/aarch64-linux-gnu` for a cross-compiled binary).
pub fn engine_command() -> std::process::Command {
    let binary = env!("CARGO_BIN_EXE_wemoe-engine");
    match std::env::var("WEMOE_TEST_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut command = std::process::Command::new(words.next().expect("a non-empty runner"));
            command.args(words).arg(binary);
            command
        }
        None => std::process::Command::new(binary),
    }
}

/// A path as &str.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// The adaptation fixture's tasks (tests/fixtures/adapt), whole sets, with their heads.
pub fn adapt_tasks(heads: &wemoe_engine::model::Heads) -> Vec<wemoe_engine::autograd::TaskBatch<'_>> {
    ["left", "right"]
        .iter()
        .map(|t| {
            let (shape, values) = reference(&format!("adapt/{t}.safetensors"), "pixel_values");
            wemoe_engine::autograd::TaskBatch {
                head: heads.head(t).unwrap(),
                pixels: wemoe_engine::tensor::Tensor::from_vec(&shape, values).unwrap(),
            }
        })
        .collect()
}

/// Runs the engine with `args`, sends it `signal` (as `kill -SIGNAL` names it: `KILL`, or `INT` for Ctrl-C) once
/// `checkpoint_step` reports at least `step`, and waits for it: the step its last checkpoint holds, and the
/// process's exit and stderr.
pub fn signal_after_checkpoint(
    args: &[String],
    checkpoint_step: impl Fn() -> Option<u64>,
    step: u64,
    signal: &str,
) -> (u64, std::process::Output) {
    let ready = || checkpoint_step().is_some_and(|s| s >= step);
    let output = signal_when(args, ready, signal, "a checkpoint");
    (checkpoint_step().unwrap(), output)
}

/// Runs the engine with `args`, sends it `signal` (as `kill -SIGNAL` names it) once `ready()` holds (`awaited`
/// says what for, should it not within a minute, or should the process end first), and waits for it: its exit
/// and stderr.
pub fn signal_when<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    ready: impl Fn() -> bool,
    signal: &str,
    awaited: &str,
) -> std::process::Output {
    let mut child = engine_command().args(args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "waited a minute for {awaited}");
        assert!(child.try_wait().unwrap().is_none(), "the process ended before {awaited}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let sent = std::process::Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status();
    assert!(sent.unwrap().success(), "kill -{signal} failed");
    child.wait_with_output().unwrap()
}

/// The files of the fixture ImageFolder `photos`, relative to it, in the order it lists them.
pub const PHOTOS: [&str; 4] = [
    "class_0/china_301x217.jpg",
    "class_0/flower_121x143.png",
    "class_1/china_61x47.jpg",
    "class_1/flower_grey_97x65.png",
];

/// The `photos` images copied straight into a new folder `dir`, unlabelled, named `0_…` to `3_…` so that they
/// sort as the tree lists them; returns the names in that order.
pub fn photos_flat(dir: &std::path::Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    PHOTOS
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let name = format!("{i}_{}", file.rsplit('/').next().unwrap());
            std::fs::copy(fixture("photos").join(file), dir.join(&name)).unwrap();
            name
        })
        .collect()
}

/// Runs, through `sh` from the root folder, the command that `wemoe-engine info OUT` prints to continue the run
/// whose checkpoint is in `out` (the engine reached through `PATH`, as a user's shell reaches it); its stderr.
pub fn run_the_resume_command_info_prints(out: &std::path::Path) -> String {
    let (ok, text, err) = engine(&["info", s(out)]);
    assert!(ok, "info {}: {err}", out.display());
    let (_, command) = text.split_once("\nresume      ").unwrap_or_else(|| panic!("no resume line: {text}"));
    let command = &command[..command.find("--resume").expect("the command ends with --resume") + "--resume".len()];
    let bin = tempfile::tempdir().unwrap();
    let wrapper = bin.path().join("wemoe-engine");
    let runner = std::env::var("WEMOE_TEST_RUNNER").unwrap_or_default();
    let script = format!("#!/bin/sh\nexec {runner} '{}' \"$@\"\n", env!("CARGO_BIN_EXE_wemoe-engine"));
    std::fs::write(&wrapper, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let run = std::process::Command::new("sh")
        .args(["-c", command])
        .env("PATH", path)
        .env_remove(wemoe_engine::device::op_times::ENV)
        .env("WEMOE_PROGRESS_SECONDS", "86400")
        .current_dir("/")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{command}\n{err}");
    err
}
