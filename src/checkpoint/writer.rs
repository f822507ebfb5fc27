//! A safetensors file written one tensor at a time: the header (every name, shape and offset) first,
//! then each tensor's f32 data as it is computed, so memory holds one tensor, not the model.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// Writes a planned list of f32 tensors, in plan order.
pub struct StreamingWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<(String, Vec<usize>)>,
    next: usize,
}

impl StreamingWriter {
    /// Creates `path` and writes the header for `plan` (name and shape of each tensor, in write order).
    pub fn create(path: &Path, plan: Vec<(String, Vec<usize>)>) -> Result<Self> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, shape) in &plan {
            let bytes = shape.iter().product::<usize>() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut text = serde_json::to_vec(&header)?;
        // Pad with spaces so the data starts 8-byte aligned, as the format recommends.
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let file = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        (|| {
            out.write_all(&(text.len() as u64).to_le_bytes())?;
            out.write_all(&text)
        })()
        .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(StreamingWriter { path: path.to_path_buf(), out, plan, next: 0 })
    }

    /// Writes the next planned tensor; `name` and the element count must match the plan.
    pub fn write(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let Some((planned, shape)) = self.plan.get(self.next) else {
            bail!("{}: tensor '{name}' is beyond the plan", self.path.display());
        };
        ensure!(planned == name, "{}: wrote '{name}' where '{planned}' was planned", self.path.display());
        ensure!(
            values.len() == shape.iter().product::<usize>(),
            "{}: '{name}' has the wrong size",
            self.path.display()
        );
        self.out
            .write_all(bytemuck::cast_slice(values))
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every planned tensor was written and flushes the file to disk.
    pub fn finish(self) -> Result<()> {
        ensure!(
            self.next == self.plan.len(),
            "{}: {} of {} tensors written",
            self.path.display(),
            self.next,
            self.plan.len()
        );
        // The buffer's last bytes reach the file here: a full disk shows now, and must name the file.
        let file = self.out.into_inner().map_err(|e| e.into_error());
        let file = file.with_context(|| format!("{}: cannot write", self.path.display()))?;
        file.sync_all().with_context(|| format!("{}: cannot flush", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::SafetensorsFile;

    #[test]
    fn streamed_files_read_back_and_mismatches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let mut w = StreamingWriter::create(&path, vec![("x".into(), vec![2, 3]), ("s".into(), vec![])]).unwrap();
        assert!(w.write("s", &[1.0]).is_err(), "out of order");
        w.write("x", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        w.write("s", &[7.5]).unwrap();
        w.finish().unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.f32("x").unwrap().host().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(f.f32("s").unwrap().host().unwrap(), &[7.5]);
        assert!(f.f32("x").unwrap().is_mapped(), "the data is 8-byte aligned");
    }

    /// A full disk (Linux's /dev/full answers every write so) is named with the file, not as a bare OS error.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_names_the_file() {
        let full = Path::new("/dev/full");
        let mut w = StreamingWriter::create(full, vec![("x".into(), vec![2])]).unwrap();
        // Held in the buffer until finish writes it out.
        w.write("x", &[1.0, 2.0]).unwrap();
        let err = format!("{:#}", w.finish().unwrap_err());
        assert!(err.starts_with("/dev/full: cannot write: "), "{err}");
    }
}
