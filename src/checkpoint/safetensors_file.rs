//! One safetensors file, memory-mapped and validated, its tensors read in place where the layout allows; or
//! a `torch.save` file (`pytorch_model.bin`), its tensors described the same way (see `torch_zip.rs`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};

use crate::tensor::Tensor;

/// A memory-mapped safetensors file whose header has been checked against its length.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<Mmap>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Maps and validates `path`: header length, JSON, every tensor's offsets, and that the data fills
    /// the file exactly (so truncated files are refused here).
    pub fn open(path: &Path) -> Result<Self> {
        crate::hub_cache::check_not_dangling(path)?;
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the map is read-only; a checkpoint modified by another process while it is mapped is
        // outside what the engine can defend against, as with every mmap-based loader.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
        let tensors = metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
        let strings = metadata.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            data_start: 8 + header_len,
            tensors,
            metadata: strings,
        })
    }

    /// Maps a `torch.save` file (PyTorch's zip format, as `pytorch_model.bin` is) and reads its state dict
    /// without running its pickle: only the opcodes and globals a state dict of tensors uses are accepted.
    /// Its tensors are then read in place like a safetensors file's.
    pub fn open_pytorch(path: &Path) -> Result<Self> {
        crate::hub_cache::check_not_dangling(path)?;
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: as in `open`.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let tensors = super::torch_zip::tensors(&map).with_context(|| format!("{}", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            data_start: 0,
            tensors,
            metadata: BTreeMap::new(),
        })
    }

    /// [`Self::open_pytorch`] for a `.bin`, `.pt` or `.pth` file, else [`Self::open`].
    pub fn open_any(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("bin" | "pt" | "pth") => Self::open_pytorch(path),
            _ => Self::open(path),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A string of the header's `__metadata__`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's dtype, shape and offsets.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).with_context(|| format!("{}: missing tensor '{name}'", self.path.display()))
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[self.data_start + info.data_offsets.0..self.data_start + info.data_offsets.1]
    }

    /// A floating-point tensor as f32: read in place when it is f32 and 4-byte aligned, else converted
    /// from f32, f16, bf16 or f64.
    pub fn f32(&self, name: &str) -> Result<Tensor> {
        let info = self.require(name)?;
        let bytes = self.bytes(info);
        let offset = self.data_start + info.data_offsets.0;
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 if offset.is_multiple_of(4) => {
                return Tensor::from_mapped(&info.shape, self.map.clone(), offset)
            }
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => {
                bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")) as f32).collect()
            }
            other => bail!("{}: tensor '{name}' has dtype {other:?}, expected a float type", self.path.display()),
        };
        Tensor::from_vec(&info.shape, values)
    }

    /// An integer tensor (any signed or unsigned width) as i64.
    pub fn integers(&self, name: &str) -> Result<Vec<i64>> {
        let info = self.require(name)?;
        let b = self.bytes(info);
        Ok(match info.dtype {
            Dtype::U8 => b.iter().map(|&v| v as i64).collect(),
            Dtype::I8 => b.iter().map(|&v| v as i8 as i64).collect(),
            Dtype::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::U16 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64).collect(),
            Dtype::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4")) as i64).collect(),
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect(),
            Dtype::U64 => b
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8")).min(i64::MAX as u64) as i64)
                .collect(),
            other => bail!("{}: tensor '{name}' has dtype {other:?}, expected integers", self.path.display()),
        })
    }

    /// A u8 tensor's shape and bytes, read in place.
    pub fn u8(&self, name: &str) -> Result<(&[usize], &[u8])> {
        let info = self.require(name)?;
        if info.dtype != Dtype::U8 {
            bail!("{}: tensor '{name}' has dtype {:?}, expected U8", self.path.display(), info.dtype);
        }
        Ok((&info.shape, self.bytes(info)))
    }

    /// Drops the pages of tensor `name` from this process's resident memory; they are read from the file
    /// again if touched. Keeps a streaming merge's footprint near one tensor instead of every input.
    pub fn release(&self, name: &str) {
        let Some(info) = self.tensors.get(name) else { return };
        let start = self.data_start + info.data_offsets.0;
        let end = self.data_start + info.data_offsets.1;
        let aligned = start - start % 4096;
        // SAFETY: the map is a read-only, file-backed mapping: MADV_DONTNEED only drops clean pages, which
        // the next access reads from the file again, so no data any tensor views is lost.
        let _ = unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, aligned, end - aligned) };
    }

    /// The shared map and the byte offset of a tensor's data, for views that outlive `self`.
    pub fn map_at(&self, name: &str) -> Result<(Arc<Mmap>, usize)> {
        let info = self.require(name)?;
        Ok((self.map.clone(), self.data_start + info.data_offsets.0))
    }
}
