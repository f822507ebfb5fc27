//! A `torch.save` file in PyTorch's zip format (`pytorch_model.bin` since PyTorch 1.6): its state dict read
//! by [`super::pickle`] without running it, and each tensor described as a safetensors header describes one
//! (dtype, shape, byte range of the mapped file), so the same code reads both in place.
//!
//! PyTorch stores every archive entry uncompressed, each storage in its own `data/<key>` entry; the reader
//! finds them through the zip's central directory (ZIP64 included, for files past 4 GiB).

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;

use super::pickle::read_state_dict;

/// An archive entry: where its bytes start in the file, how many, and whether they are stored as they are.
struct Entry {
    start: usize,
    len: usize,
    stored: bool,
}

fn u16_at(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..at + 2).context("a zip record runs past the end of the file")?;
    Ok(u64::from(u16::from_le_bytes([s[0], s[1]])))
}

fn u32_at(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..at + 4).context("a zip record runs past the end of the file")?;
    Ok(u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    let s = b.get(at..at + 8).context("a zip record runs past the end of the file")?;
    Ok(u64::from_le_bytes(s.try_into()?))
}

fn usize_of(v: u64) -> Result<usize> {
    usize::try_from(v).context("a zip offset past this machine's address space")
}

/// Every entry of the zip archive `b`, by name.
fn entries(b: &[u8]) -> Result<HashMap<String, Entry>> {
    const EOCD: &[u8] = b"PK\x05\x06";
    let tail = b.len().saturating_sub(22 + 65535);
    let eocd = (tail..b.len().saturating_sub(21))
        .rev()
        .find(|&i| &b[i..i + 4] == EOCD)
        .context("no end of central directory: not a zip archive, or a truncated one")?;
    let (mut count, mut cd_offset) = (u16_at(b, eocd + 10)?, u32_at(b, eocd + 16)?);
    if count == 0xFFFF || cd_offset == 0xFFFF_FFFF {
        // ZIP64: the locator just before the end record points at the ZIP64 end record.
        ensure!(eocd >= 20 && &b[eocd - 20..eocd - 16] == b"PK\x06\x07", "a ZIP64 archive without its locator");
        let record = usize_of(u64_at(b, eocd - 12)?)?;
        ensure!(
            b.get(record..record.saturating_add(4)) == Some(b"PK\x06\x06"),
            "a ZIP64 locator pointing at no ZIP64 record"
        );
        (count, cd_offset) = (u64_at(b, record + 32)?, u64_at(b, record + 48)?);
    }
    let mut at = usize_of(cd_offset)?;
    let mut found = HashMap::new();
    for _ in 0..count {
        ensure!(b.get(at..at + 4) == Some(b"PK\x01\x02"), "a damaged central directory (at byte {at})");
        let method = u16_at(b, at + 10)?;
        let (mut size, name_len) = (u32_at(b, at + 20)?, usize_of(u16_at(b, at + 28)?)?);
        let (extra_len, comment_len) = (usize_of(u16_at(b, at + 30)?)?, usize_of(u16_at(b, at + 32)?)?);
        let mut local = u32_at(b, at + 42)?;
        let name = std::str::from_utf8(b.get(at + 46..at + 46 + name_len).context("a truncated entry name")?)?;
        // ZIP64 extra field: the 64-bit values of whichever fields hold 0xFFFFFFFF, in this order.
        let mut extra = at + 46 + name_len;
        let extra_end = extra + extra_len;
        while extra + 4 <= extra_end {
            let (id, len) = (u16_at(b, extra)?, usize_of(u16_at(b, extra + 2)?)?);
            if id == 1 {
                let mut field = extra + 4;
                if u32_at(b, at + 24)? == 0xFFFF_FFFF {
                    field += 8; // uncompressed size (equal to the compressed one for a stored entry)
                }
                if size == 0xFFFF_FFFF {
                    size = u64_at(b, field)?;
                    field += 8;
                }
                if local == 0xFFFF_FFFF {
                    local = u64_at(b, field)?;
                }
            }
            extra += 4 + len;
        }
        let local = usize_of(local)?;
        ensure!(
            b.get(local..local.saturating_add(4)) == Some(b"PK\x03\x04"),
            "entry {name}: no local header where it should be"
        );
        let start = local + 30 + usize_of(u16_at(b, local + 26)?)? + usize_of(u16_at(b, local + 28)?)?;
        let len = usize_of(size)?;
        ensure!(start.checked_add(len).is_some_and(|end| end <= b.len()), "entry {name} runs past the end of the file");
        found.insert(name.to_string(), Entry { start, len, stored: method == 0 });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(found)
}

/// The tensors of the `torch.save` file mapped in `map`, as safetensors describes tensors (offsets from the
/// file's first byte).
pub(super) fn tensors(map: &Mmap) -> Result<BTreeMap<String, TensorInfo>> {
    if map.first() == Some(&0x80) {
        bail!("a PyTorch file in the format before 1.6 (a bare pickle, not a zip archive): resave it with torch.save");
    }
    let entries = entries(map)?;
    let pickles: Vec<&String> = entries.keys().filter(|n| n.ends_with("/data.pkl") || *n == "data.pkl").collect();
    let [pickle] = pickles.as_slice() else {
        bail!("a zip archive with {} data.pkl entries, not a torch.save file", pickles.len())
    };
    let prefix = &pickle[..pickle.len() - "data.pkl".len()];
    if let Some(order) = entries.get(&format!("{prefix}byteorder")) {
        let order = &map[order.start..order.start + order.len];
        ensure!(
            order == b"little",
            "saved on a {} machine: only little-endian files are read",
            String::from_utf8_lossy(order)
        );
    }
    let pkl = &entries[*pickle];
    ensure!(pkl.stored, "{pickle} is compressed; torch.save stores it as it is");
    let state = read_state_dict(&map[pkl.start..pkl.start + pkl.len])?;
    let mut tensors = BTreeMap::new();
    for (name, t) in state {
        let storage = format!("{prefix}data/{}", t.storage);
        let entry = entries.get(&storage).with_context(|| format!("tensor '{name}': no storage {storage}"))?;
        ensure!(entry.stored, "tensor '{name}': its storage is compressed");
        // Row-major strides (a dimension of size 1 may have any): what reading the bytes in place needs.
        let mut expected = 1;
        for (&size, &stride) in t.shape.iter().zip(&t.stride).rev() {
            ensure!(
                size == 1 || stride == expected,
                "tensor '{name}' is a strided view (size {:?}, strides {:?}); save a contiguous copy",
                t.shape,
                t.stride
            );
            expected *= size;
        }
        let width = t.dtype.bitsize() / 8; // every storage type has whole bytes
        let (first, len) = (t.offset * width, expected * width);
        ensure!(first + len <= entry.len, "tensor '{name}' runs past the end of its storage {storage}");
        let data_offsets = (entry.start + first, entry.start + first + len);
        tensors.insert(name, TensorInfo { dtype: t.dtype, shape: t.shape, data_offsets });
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-entry archive whose sizes, offset, entry count and directory offset all live in ZIP64 fields,
    /// as PyTorch writes them for files past 4 GiB.
    fn zip64_archive(name: &str, data: &[u8]) -> Vec<u8> {
        let le16 = |v: u16| v.to_le_bytes().to_vec();
        let le32 = |v: u32| v.to_le_bytes().to_vec();
        let le64 = |v: u64| v.to_le_bytes().to_vec();
        let mut zip = [b"PK\x03\x04".to_vec(), vec![0; 22], le16(name.len() as u16), le16(0)].concat();
        zip.extend(name.as_bytes());
        zip.extend(data);
        let directory = zip.len() as u64;
        let extra = [le16(1), le16(24), le64(data.len() as u64), le64(data.len() as u64), le64(0)].concat();
        zip.extend([b"PK\x01\x02".to_vec(), vec![0; 6], le16(0), vec![0; 8]].concat()); // stored
        zip.extend([le32(u32::MAX), le32(u32::MAX), le16(name.len() as u16), le16(extra.len() as u16)].concat());
        zip.extend([le16(0), vec![0; 8], le32(u32::MAX)].concat());
        zip.extend(name.as_bytes());
        zip.extend(extra);
        let directory_len = zip.len() as u64 - directory;
        let record = zip.len() as u64;
        zip.extend([b"PK\x06\x06".to_vec(), le64(44), vec![0; 12], le64(1), le64(1)].concat());
        zip.extend([le64(directory_len), le64(directory)].concat());
        zip.extend([b"PK\x06\x07".to_vec(), le32(0), le64(record), le32(1)].concat());
        zip.extend([b"PK\x05\x06".to_vec(), vec![0; 4], le16(u16::MAX), le16(u16::MAX)].concat());
        zip.extend([le32(u32::MAX), le32(u32::MAX), le16(0)].concat());
        zip
    }

    #[test]
    fn zip64_records_locate_an_entry() {
        let zip = zip64_archive("archive/data/0", b"0123456789");
        let found = entries(&zip).unwrap();
        let entry = &found["archive/data/0"];
        assert!(entry.stored);
        assert_eq!(&zip[entry.start..entry.start + entry.len], b"0123456789");
        let err = entries(&zip[..zip.len() - 30]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no end of central directory"), "{err}");
    }
}
