//! Output files written atomically: to a partial file beside the target ([`Partial`]), then renamed, so a
//! failed or interrupted command never leaves a partial file under the requested name, nor beside it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::partial::Partial;

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = Partial::beside(path);
    (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(partial.path())?;
        file.write_all(bytes)?;
        file.sync_all()?;
        partial.finish(path)
    })()
    .with_context(|| format!("{}: cannot write", path.display()))
}

/// Checks, before any work, that a file can later be written at `path`, given as option `flag`: its folder
/// exists and takes new files, and `path` is not a folder. A long command should not compute for an hour and
/// then fail to save.
pub fn check_file_target(flag: &str, path: &Path) -> Result<()> {
    // `--json -` means standard output; a binary output given `-` would otherwise become a file named `-`.
    anyhow::ensure!(
        path != Path::new("-"),
        "{flag} -: this output is a file, not standard output; give a file name (./- for a file named '-')"
    );
    anyhow::ensure!(!path.is_dir(), "{flag} {}: is a folder; give a file name", path.display());
    // A trailing slash names a folder even where none exists; it would fail only at the write, after the work.
    let folder_name = path.as_os_str().as_encoded_bytes().last().is_some_and(|&b| std::path::is_separator(b as char));
    anyhow::ensure!(!folder_name, "{flag} {}: names a folder (it ends with a slash); give a file name", path.display());
    let parent = parent_folder(path);
    anyhow::ensure!(parent.is_dir(), "{flag} {}: folder {} does not exist", path.display(), parent.display());
    // A read-only file system or a folder without write permission: the partial file the write will make, made
    // and removed now (the guard's drop).
    let probe = Partial::beside(path);
    std::fs::File::create(probe.path())
        .with_context(|| format!("{flag} {}: cannot write in folder {}", path.display(), parent.display()))?;
    Ok(())
}

/// Checks that an output folder `dir`, given as option `flag`, can be made where it does not exist yet: its parent
/// must exist. A missing parent (a typo) is refused rather than made, since a failed run would leave it behind.
pub fn check_folder_target(flag: &str, dir: &Path) -> Result<()> {
    anyhow::ensure!(
        dir.exists() || parent_folder(dir).is_dir(),
        "{}: the parent directory of {flag} does not exist",
        dir.display()
    );
    Ok(())
}

/// The folder `path` lies in: its parent, or `.` for a bare name.
pub fn parent_folder(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// True when `path` is a folder with nothing in it: an output folder made ahead of the command (`mkdir out`), or
/// left by a run killed before it wrote anything, which a command may take as if it did not exist.
pub fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// Checks, once the inputs are open, that writing `path` (option `flag`) will not replace one of the files the
/// command reads: `embed --images data.safetensors --out data.safetensors` would otherwise lose the data.
pub fn check_not_an_input(flag: &str, path: &Path, inputs: &[PathBuf]) -> Result<()> {
    // Only an existing file can be an input; the same file by another name (a link, `./`, `..`) still is.
    let Ok(target) = path.canonicalize() else { return Ok(()) };
    if let Some(input) = inputs.iter().find(|i| i.canonicalize().is_ok_and(|i| i == target)) {
        anyhow::bail!(
            "{flag} {}: would replace {}, one of this command's inputs; give another file name",
            path.display(),
            input.display()
        );
    }
    Ok(())
}

/// A named f32 tensor to save.
pub struct NamedTensor {
    /// Its key in the file.
    pub name: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Its elements, row-major.
    pub values: Vec<f32>,
}

/// Views of f32 tensors for safetensors' serialiser.
fn views(tensors: &[NamedTensor]) -> Result<Vec<(String, TensorView<'_>)>> {
    tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.values))
                .with_context(|| format!("tensor '{}' does not fit shape {:?}", t.name, t.shape))?;
            Ok((t.name.clone(), view))
        })
        .collect()
}

/// Serialises f32 tensors to safetensors bytes.
pub fn safetensors_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    Ok(safetensors::serialize(views(tensors)?, None)?)
}

/// Writes f32 tensors to a safetensors file atomically.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    write_atomic(path, &safetensors_bytes(tensors)?)
}

/// Writes f32 tensors and string metadata to a safetensors file atomically.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: std::collections::BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors_with_integers(path, tensors, &[], metadata)
}

/// Writes f32 tensors, one-dimensional i64 tensors (labels, say) and string metadata to a safetensors file
/// atomically; no metadata header when `metadata` is empty.
pub fn write_safetensors_with_integers(
    path: &Path,
    tensors: &[NamedTensor],
    integers: &[(&str, &[i64])],
    metadata: std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let mut all = views(tensors)?;
    for &(name, values) in integers {
        let view = TensorView::new(Dtype::I64, vec![values.len()], bytemuck::cast_slice(values))
            .with_context(|| format!("tensor '{name}'"))?;
        all.push((name.to_string(), view));
    }
    let metadata = (!metadata.is_empty()).then(|| metadata.into_iter().collect());
    write_atomic(path, &canonical_header(safetensors::serialize(all, metadata)?)?)
}

/// The same file with its header's keys in sorted order. safetensors keeps the metadata in a `HashMap`, whose
/// order changes from one map to the next, so a file with two metadata keys came out in either order: the
/// same tensors and metadata gave other bytes (a resumed AdaMerging run's coefficients file differed from an
/// uninterrupted run's in its header alone). The offsets are relative to the data, which is kept as it is.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().context("a safetensors file of under 8 bytes")?) as usize;
    // serde_json's maps are ordered by key (no `preserve_order`): parsing and writing sorts every key.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).context("safetensors header")?;
    let mut text = serde_json::to_string(&header)?;
    // The data starts 8-byte aligned, as safetensors pads it.
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let tensors = [
            NamedTensor { name: "b".into(), shape: vec![2], values: vec![1.0, -0.0] },
            NamedTensor { name: "a".into(), shape: vec![1, 3], values: vec![0.5, 2.0, 3.0] },
        ];
        let metadata: std::collections::BTreeMap<String, String> = ["zeta", "alpha", "mu", "beta", "omega", "kappa"]
            .iter()
            .map(|k| (k.to_string(), format!("{k}!")))
            .collect();
        let files: Vec<Vec<u8>> = (0..12)
            .map(|i| {
                let path = tmp.path().join(format!("{i}.safetensors"));
                write_safetensors_with_integers(&path, &tensors, &[("labels", &[3, 1])], metadata.clone()).unwrap();
                std::fs::read(&path).unwrap()
            })
            .collect();
        assert!(files.iter().all(|f| f == &files[0]), "one file's bytes differ");
        // Still a safetensors file, read back whole.
        let file = crate::checkpoint::SafetensorsFile::open(&tmp.path().join("0.safetensors")).unwrap();
        assert_eq!(file.metadata("mu"), Some("mu!"));
        assert_eq!(file.f32("a").unwrap().host().unwrap(), [0.5, 2.0, 3.0]);
        assert_eq!(file.f32("b").unwrap().host().unwrap()[1].to_bits(), (-0.0f32).to_bits());
        let n = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&files[0][8..8 + n]).unwrap();
        let keys: Vec<usize> =
            ["alpha", "beta", "kappa", "mu", "omega", "zeta"].iter().map(|k| header.find(k).unwrap()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "metadata keys in order: {header}");
    }
}
