//! Output files written atomically: to a temporary name beside the target, then renamed, so a failed
//! or interrupted command never leaves a partial file under the requested name.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A temporary path beside `path`, unique to this process.
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{}: cannot write", path.display()))
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
    write_atomic(path, &safetensors::serialize(all, metadata)?)
}
