//! A tensor: a shape and the storage of its f32 elements on one device.
//!
//! Host tensors either own their elements or borrow them, zero-copy, from a memory-mapped checkpoint.
//! Device tensors hold a range of a backend's buffer, whose type only that backend knows.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use memmap2::Mmap;

use crate::device::Device;

/// f32 elements in host memory.
pub enum HostBuffer {
    /// Elements the tensor owns.
    Owned(Vec<f32>),
    /// Elements read in place from a memory map.
    Mapped {
        /// The mapped file.
        map: Arc<Mmap>,
        /// Where the elements start, in bytes: 4-byte aligned.
        offset: usize,
        /// How many elements.
        len: usize,
    },
}

impl HostBuffer {
    /// The elements as a slice.
    pub fn as_slice(&self) -> &[f32] {
        match self {
            HostBuffer::Owned(v) => v,
            HostBuffer::Mapped { map, offset, len } => bytemuck::cast_slice(&map[*offset..*offset + *len * 4]),
        }
    }

    /// True when the elements are read in place from a file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, HostBuffer::Mapped { .. })
    }
}

/// A range of a device buffer: `len` elements from element `offset` of `buffer`, whose concrete type belongs
/// to the backend that made it (several tensors may share one buffer, e.g. stacked task vectors).
pub struct DeviceBuffer {
    /// The device.
    pub device: Device,
    /// The backend's buffer.
    pub buffer: Arc<dyn Any + Send + Sync>,
    /// First element.
    pub offset: usize,
    /// Element count.
    pub len: usize,
}

/// Where a tensor's elements live.
pub enum Storage {
    /// Host memory, used by the CPU backend.
    Cpu(HostBuffer),
    /// A device buffer, used by the CUDA backend.
    Device(DeviceBuffer),
}

/// A dense, row-major f32 tensor.
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A host tensor that owns `data`; fails when the element count does not match the shape.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        ensure!(numel == data.len(), "shape {shape:?} holds {numel} elements, but {} were given", data.len());
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(HostBuffer::Owned(data)) })
    }

    /// A host tensor read in place from `map` at byte `offset` (4-byte aligned, checked).
    pub fn from_mapped(shape: &[usize], map: Arc<Mmap>, offset: usize) -> Result<Self> {
        let len: usize = shape.iter().product();
        ensure!(offset.is_multiple_of(4), "mapped tensor at byte {offset} is not 4-byte aligned");
        ensure!(offset + len * 4 <= map.len(), "mapped tensor runs past the end of its file");
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(HostBuffer::Mapped { map, offset, len }) })
    }

    /// A tensor over a device buffer range; fails when the range does not hold the shape's elements.
    pub fn on_device(shape: &[usize], buffer: DeviceBuffer) -> Result<Self> {
        let numel: usize = shape.iter().product();
        ensure!(numel == buffer.len, "shape {shape:?} holds {numel} elements, the device range {}", buffer.len);
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Device(buffer) })
    }

    /// A host tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        let numel = shape.iter().product();
        Tensor { shape: shape.to_vec(), storage: Storage::Cpu(HostBuffer::Owned(vec![0.0; numel])) }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The device holding the elements.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Device(d) => d.device,
        }
    }

    /// The storage, for backends.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The elements of a host tensor; an error for a tensor on another device.
    pub fn host(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(buf) => Ok(buf.as_slice()),
            Storage::Device(d) => bail!("tensor {:?} lives on {}; copy it to the host first", self.shape, d.device),
        }
    }

    /// The elements of a host tensor as an owned vector: moved when owned, copied when mapped.
    pub fn into_host_vec(self) -> Result<Vec<f32>> {
        match self.storage {
            Storage::Cpu(HostBuffer::Owned(v)) => Ok(v),
            Storage::Cpu(buf) => Ok(buf.as_slice().to_vec()),
            Storage::Device(d) => bail!("tensor {:?} lives on {}; copy it to the host first", self.shape, d.device),
        }
    }

    /// True when the elements are read in place from a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        match &self.storage {
            Storage::Cpu(buf) => buf.is_mapped(),
            Storage::Device(_) => false,
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            bail!("cannot reshape {:?} to {shape:?}", self.shape);
        }
        Ok(Tensor { shape: shape.to_vec(), storage: self.storage })
    }

    /// The first position and value of a NaN or infinity, if any. Every model tensor passes through this at
    /// load, so the common case is a scan that finds nothing: blocks of 4096 values in parallel, each
    /// reduced without an early exit (which the compiler vectorises, where `find` compares one value at a
    /// time), and only a block that holds one searched in order.
    pub fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        use rayon::prelude::*;
        const BLOCK: usize = 4096;
        let values = self.host()?;
        let block_has_one = |block: &[f32]| block.iter().fold(false, |any, v| any | !v.is_finite());
        Ok(values.par_chunks(BLOCK).position_first(block_has_one).map(|b| {
            let (at, v) =
                values[b * BLOCK..].iter().enumerate().find(|(_, v)| !v.is_finite()).expect("the block has one");
            (b * BLOCK + at, *v)
        }))
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?} on {})", self.shape, self.device())
    }
}

#[cfg(test)]
mod tests {
    use super::Tensor;

    /// The first non-finite value is found wherever it lies: none, in the first block, deep in a later one
    /// with another after it (the earlier wins, across blocks and threads), and in a ragged last block.
    #[test]
    fn first_non_finite_finds_the_earliest() {
        let n = 3 * 4096 + 100;
        let at = |marks: &[(usize, f32)]| {
            let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
            marks.iter().for_each(|&(i, x)| v[i] = x);
            Tensor::from_vec(&[n], v).unwrap().first_non_finite().unwrap()
        };
        assert_eq!(at(&[]), None);
        assert_eq!(at(&[(5, f32::INFINITY)]), Some((5, f32::INFINITY)));
        assert_eq!(
            at(&[(2 * 4096 + 9, f32::NEG_INFINITY), (n - 1, f32::INFINITY)]),
            Some((2 * 4096 + 9, f32::NEG_INFINITY))
        );
        let (i, v) = at(&[(n - 3, f32::NAN)]).unwrap();
        assert!(i == n - 3 && v.is_nan());
    }
}
