//! Hugging Face `datasets` parquet files, the form FusionBench's tasks take on the hub: an image column
//! (the `Image` feature's struct of `bytes` and `path`, or plain bytes) and an integer label column; one
//! file, a folder of one split's shards, or a split's prefix (`data/test`), shards read in name order. The
//! encoded images are kept in memory and decoded per batch; class names come from the `huggingface` schema
//! metadata when it has them.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::Value;

/// A parquet dataset's encoded images, labels and class names.
pub struct ParquetImages {
    /// Each row's encoded image (PNG, JPEG, ...).
    pub images: Vec<Vec<u8>>,
    /// Each row's label, when there is a label column.
    pub labels: Option<Vec<i64>>,
    /// The label column's class names, when the metadata gives them.
    pub classes: Option<Vec<String>>,
}

fn is_parquet_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The split a shard names, as the hub names shards: `test` for `test-00000-of-00002.parquet`; `None` for
/// other names (`0000.parquet` in a split's own folder, or a file of the user's).
fn split_of(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [total, "of", index, split] if number(total) && number(index) => Some(split.to_string()),
        _ => None,
    }
}

/// The parquet files of a folder.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && is_parquet_file(p)).collect()
}

/// The shards of the parquet dataset `path` names, in name order: a `.parquet` file; a folder holding `.parquet` files (one split's)
/// and no subfolders; or, where nothing exists at `path`, a split's prefix in its folder (`data/test` for
/// `data/test-00000-of-00002.parquet` and the rest), as the hub lays datasets out. `None` when `path` is none
/// of these.
pub fn parquet_shards(path: &Path) -> Option<Vec<PathBuf>> {
    let mut shards = if path.is_file() {
        is_parquet_file(path).then(|| vec![path.to_path_buf()])?
    } else if path.is_dir() {
        let has_folders = std::fs::read_dir(path).ok()?.filter_map(|e| e.ok()).any(|e| e.path().is_dir());
        Some(parquet_files(path)).filter(|f| !f.is_empty() && !has_folders)?
    } else {
        let (dir, split) = (path.parent()?, path.file_name()?.to_str()?);
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        Some(parquet_files(dir).into_iter().filter(|p| split_of(p).as_deref() == Some(split)).collect::<Vec<_>>())
            .filter(|f| !f.is_empty())?
    };
    shards.sort();
    Some(shards)
}

/// The image and label columns, and the label's class names, of a shard's schema: from the `huggingface`
/// metadata's features when present (the `Image` feature; the `ClassLabel` named `label`, else the first),
/// else the columns named `image` or `img` and `label` or `labels`.
struct Columns {
    /// Every top-level column, in schema order.
    names: Vec<String>,
    image: Option<String>,
    label: Option<String>,
    classes: Option<Vec<String>>,
}

fn columns(reader: &SerializedFileReader<std::fs::File>) -> Columns {
    let meta = reader.metadata().file_metadata();
    let names: Vec<String> =
        meta.schema_descr().root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let features = meta
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == "huggingface"))
        .and_then(|kv| kv.value.as_deref())
        .and_then(|v| serde_json::from_str::<Value>(v).ok())
        .and_then(|v| v.pointer("/info/features").cloned())
        .and_then(|f| f.as_object().cloned())
        .unwrap_or_default();
    let typed = |kind: &str| -> Vec<String> {
        features
            .iter()
            .filter(|(name, f)| f.get("_type").and_then(Value::as_str) == Some(kind) && names.contains(name))
            .map(|(name, _)| name.clone())
            .collect()
    };
    let named = |candidates: &[&str]| candidates.iter().find(|c| names.iter().any(|n| n == *c)).map(|c| c.to_string());
    let image = typed("Image").into_iter().next().or_else(|| named(&["image", "img"]));
    let class_labels = typed("ClassLabel");
    let label = class_labels
        .iter()
        .find(|n| *n == "label")
        .or(class_labels.first())
        .cloned()
        .or_else(|| named(&["label", "labels"]));
    let classes = label
        .as_ref()
        .and_then(|l| features.get(l))
        .and_then(|f| f.get("names"))
        .and_then(|n| n.as_array().map(|a| a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect()));
    Columns { names, image, label, classes }
}

/// Reads every row's encoded image and label from `shards`, the [`parquet_shards`] of `path`.
pub fn read_parquet(path: &Path, shards: &[PathBuf]) -> Result<ParquetImages> {
    let splits: std::collections::BTreeSet<String> = shards.iter().filter_map(|p| split_of(p)).collect();
    if splits.len() > 1 {
        let names: Vec<&str> = splits.iter().map(String::as_str).collect();
        let first = path.join(names[0]);
        bail!(
            "{}: holds the shards of several splits ({}); name one split, e.g. {}",
            path.display(),
            names.join(", "),
            first.display()
        );
    }
    let mut images = Vec::new();
    let mut labels: Option<Vec<i64>> = None;
    let mut classes = None;
    for (s, shard) in shards.iter().enumerate() {
        let file = std::fs::File::open(shard).with_context(|| format!("{}: cannot open", shard.display()))?;
        let reader =
            SerializedFileReader::new(file).with_context(|| format!("{}: not a parquet file", shard.display()))?;
        let Columns { names, image, label, classes: shard_classes } = columns(&reader);
        let Some(image) = image else {
            bail!(
                "{}: no image column (an `Image` feature, or a column named image or img); its columns: {}",
                shard.display(),
                names.join(", ")
            );
        };
        if s == 0 {
            labels = label.as_ref().map(|_| Vec::new());
            classes = shard_classes;
        } else {
            ensure!(
                labels.is_some() == label.is_some(),
                "{}: {} a label column where {} {}",
                shard.display(),
                if label.is_some() { "has" } else { "lacks" },
                shards[0].display(),
                if labels.is_some() { "has one" } else { "has none" }
            );
        }
        let rows = reader.get_row_iter(None).with_context(|| format!("{}: unreadable rows", shard.display()))?;
        for (r, row) in rows.enumerate() {
            let row = row.with_context(|| format!("{}: row {r} unreadable", shard.display()))?;
            let at = || format!("{} row {r}", shard.display());
            let mut found_image = None;
            let mut found_label = None;
            for (name, field) in row.get_column_iter() {
                if *name == image {
                    found_image = Some(image_bytes(field).with_context(at)?);
                } else if Some(name) == label.as_ref() {
                    found_label = Some(integer(field).with_context(at)?);
                }
            }
            images.push(found_image.with_context(|| format!("{}: no image", at()))?);
            if let (Some(all), Some(l)) = (labels.as_mut(), found_label) {
                ensure!(l >= 0, "{}: label {l} is negative", at());
                all.push(l);
            }
        }
    }
    ensure!(!images.is_empty(), "{}: holds no rows", path.display());
    Ok(ParquetImages { images, labels, classes })
}

/// An image cell's encoded bytes: the `Image` feature's `bytes`, or a binary cell.
fn image_bytes(field: &Field) -> Result<Vec<u8>> {
    match field {
        Field::Bytes(b) => Ok(b.data().to_vec()),
        Field::Group(group) => {
            let mut path = None;
            for (name, f) in group.get_column_iter() {
                match (name.as_str(), f) {
                    ("bytes", Field::Bytes(b)) => return Ok(b.data().to_vec()),
                    ("path", Field::Str(p)) => path = Some(p.clone()),
                    _ => {}
                }
            }
            match path {
                Some(p) => bail!("the image is stored as a path ({p}), not as bytes; point --images at the files"),
                None => bail!("the image cell has no bytes"),
            }
        }
        Field::Null => bail!("the image is missing (null)"),
        other => bail!("the image cell is not binary ({other})"),
    }
}

/// A label cell as an integer.
fn integer(field: &Field) -> Result<i64> {
    Ok(match *field {
        Field::Byte(v) => v.into(),
        Field::Short(v) => v.into(),
        Field::Int(v) => v.into(),
        Field::Long(v) => v,
        Field::UByte(v) => v.into(),
        Field::UShort(v) => v.into(),
        Field::UInt(v) => v.into(),
        Field::ULong(v) => i64::try_from(v).context("label out of range")?,
        Field::Null => bail!("the label is missing (null)"),
        ref other => bail!("the label is not an integer ({other})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_names_its_split_as_the_hub_does() {
        for (file, split) in [
            ("test-00000-of-00002.parquet", Some("test")),
            ("validation-00003-of-00010.parquet", Some("validation")),
            ("my-split-00000-of-00001.parquet", Some("my-split")),
            ("0000.parquet", None),
            ("test-of-00002.parquet", None),
            ("data.parquet", None),
        ] {
            assert_eq!(split_of(Path::new(file)).as_deref(), split, "{file}");
        }
    }
}
