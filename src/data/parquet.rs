//! Hugging Face `datasets` parquet files, the form FusionBench's tasks take on the hub: an image column
//! (the `Image` feature's struct of `bytes` and `path`, or plain bytes) and an integer label column (-1 or null
//! where a row has none, as in a test split whose labels are withheld); one
//! file, a folder of one split's shards, or a split's prefix (`data/test`), shards read in name order. Every
//! row is checked when the dataset opens; afterwards the encoded images are read from the files as batches
//! ask for them (a cursor that runs on through consecutive rows), so memory holds a batch, not the split.
//! Class names come from the `huggingface` schema metadata when it has them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::Value;

/// Rows the row reader decodes at a time (its default, 1,024, would hold a thousand images).
const ROWS_PER_READ: usize = 16;

/// A checked parquet dataset: its labels and class names, and where each row's image is.
pub struct ParquetImages {
    /// Each row's label, when there is a label column and not every row's label is withheld.
    pub labels: Option<Vec<i64>>,
    /// Whether there is a label column whose every row is -1 or null (a test split's labels withheld).
    pub labels_withheld: bool,
    /// The label column's class names, when the metadata gives them.
    pub classes: Option<Vec<String>>,
    /// The rows' encoded images, read on demand.
    pub images: ParquetRows,
}

/// One shard's place in the dataset.
struct Shard {
    path: PathBuf,
    /// The image column.
    image: String,
    /// The dataset's row index of the shard's first row.
    first: usize,
    /// Rows in each of the shard's row groups.
    groups: Vec<usize>,
}

/// Where the reading stands: the row reader of one shard (from one of its row groups on) and the dataset's
/// row index it yields next.
struct Cursor {
    shard: usize,
    next: usize,
    rows: RowIter<'static>,
}

/// The encoded images of a parquet dataset's rows, read from its files on demand.
pub struct ParquetRows {
    shards: Vec<Shard>,
    len: usize,
    cursor: Mutex<Option<Cursor>>,
}

impl ParquetRows {
    /// The number of rows.
    pub fn count(&self) -> usize {
        self.len
    }

    /// The encoded images of rows `indices`, in that order. A row at or after the cursor in its row group
    /// continues the last read; any other opens its shard again at the row's row group.
    pub fn read(&self, indices: &[usize]) -> Result<Vec<Vec<u8>>> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let read: Result<Vec<Vec<u8>>> = indices.iter().map(|&i| self.read_one(&mut cursor, i)).collect();
        if read.is_err() {
            // No half-advanced reader is kept after a failure.
            *cursor = None;
        }
        read
    }

    fn read_one(&self, cursor: &mut Option<Cursor>, i: usize) -> Result<Vec<u8>> {
        ensure!(i < self.len, "row {i} of {}", self.len);
        let s = self.shards.partition_point(|shard| shard.first <= i) - 1;
        let shard = &self.shards[s];
        let (group, start) = shard.group_of(i);
        if !cursor.as_ref().is_some_and(|c| c.shard == s && (start..=i).contains(&c.next)) {
            *cursor = Some(self.open_at(s, group, start)?);
        }
        let c = cursor.as_mut().expect("opened above");
        loop {
            let at = c.next;
            let row = c.rows.next().with_context(|| format!("{}: ends before row {}", shard.path.display(), i))?;
            let row = row.with_context(|| format!("{}: row {} unreadable", shard.path.display(), at - shard.first))?;
            c.next += 1;
            if at == i {
                let (_, field) = row.get_column_iter().next().context("a projected row without its column")?;
                let bytes =
                    image_bytes(field).with_context(|| format!("{} row {}", shard.path.display(), i - shard.first))?;
                return Ok(bytes.to_vec());
            }
        }
    }

    /// A cursor on shard `s` at the start of its row group `group`, whose first row is dataset row `start`.
    fn open_at(&self, s: usize, group: usize, start: usize) -> Result<Cursor> {
        let shard = &self.shards[s];
        let options = ReadOptionsBuilder::new().with_predicate(Box::new(move |_, g| g >= group)).build();
        let file = open_shard(&shard.path)?;
        let reader = SerializedFileReader::new_with_options(file, options)
            .with_context(|| format!("{}: not a parquet file", shard.path.display()))?;
        let projection = projection(&reader, &[&shard.image])?;
        let rows = RowIter::from_file_into(Box::new(reader))
            .project(Some(projection))
            .with_context(|| format!("{}: cannot read column {}", shard.path.display(), shard.image))?
            .with_batch_size(ROWS_PER_READ);
        Ok(Cursor { shard: s, next: start, rows })
    }
}

impl Shard {
    /// The row group holding dataset row `row` (one of this shard's), and that group's first row.
    fn group_of(&self, row: usize) -> (usize, usize) {
        let (mut group, mut start) = (0, self.first);
        while start + self.groups[group] <= row {
            start += self.groups[group];
            group += 1;
        }
        (group, start)
    }
}

/// The schema of `reader`'s columns `names` alone, for reading only them.
fn projection(reader: &SerializedFileReader<std::fs::File>, names: &[&str]) -> Result<Type> {
    let root = reader.metadata().file_metadata().schema_descr().root_schema();
    let fields = root.get_fields().iter().filter(|f| names.contains(&f.name())).cloned().collect();
    Ok(Type::group_type_builder(root.name()).with_fields(fields).build()?)
}

pub(crate) fn is_parquet_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The split a shard names, as the hub names shards: `test` for `test-00000-of-00002.parquet`; `None` for
/// other names (`0000.parquet` in a split's own folder, or a file of the user's).
pub(crate) fn split_of(path: &Path) -> Option<String> {
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
    // A link to nothing stays, for `open_shard` to name: left out, a split would silently lose a shard.
    let file = |p: &PathBuf| p.is_file() || crate::hub_cache::is_dangling(p);
    entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| file(p) && is_parquet_file(p)).collect()
}

/// Opens a shard, naming a link to a blob that is not there (a download into the Hugging Face cache that did
/// not finish) as such.
fn open_shard(path: &Path) -> Result<std::fs::File> {
    crate::hub_cache::check_not_dangling(path)?;
    std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// The shards of the parquet dataset `path` names, in name order: a `.parquet` file; a folder holding
/// `.parquet` files (one split's) and no subfolders; or, where nothing exists at `path`, a split's prefix in its
/// folder (`data/test` for `data/test-00000-of-00002.parquet` and the rest), as the hub lays datasets out.
/// `None` when `path` is none of these.
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
/// metadata's features when present (the `Image` feature; the `ClassLabel` named `label`, else the first in
/// column order), else the columns named `image` or `img` and `label` or `labels`.
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
    // In the columns' order: the features' map is sorted by name, and CIFAR-100's `fine_label` must win over
    // its `coarse_label`, which sorts first.
    let typed = |kind: &str| -> Vec<String> {
        names
            .iter()
            .filter(|name| features.get(*name).and_then(|f| f.get("_type")).and_then(Value::as_str) == Some(kind))
            .cloned()
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

/// The class names in the `huggingface` metadata of the first of `shards` (the [`parquet_shards`] of
/// `path`), as a dataset opened from them has them, without reading a row; `None` when it names none.
pub fn parquet_class_names(path: &Path, shards: &[PathBuf]) -> Result<Option<Vec<String>>> {
    let first = shards.first().with_context(|| format!("{}: no parquet shards", path.display()))?;
    let file = open_shard(first)?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a parquet file", first.display()))?;
    Ok(columns(&reader).classes)
}

/// Checks every row of `shards`, the [`parquet_shards`] of `path` (each has an image, and a label where
/// the shards have a label column), and reads the labels; the images stay in the files.
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
    let mut placed = Vec::new();
    let mut len = 0;
    let mut labels: Option<Vec<i64>> = None;
    // The first row with a label and the first without one (-1 or null): a split may be either throughout.
    let (mut labelled, mut unlabelled): (Option<String>, Option<String>) = (None, None);
    let mut classes = None;
    for (s, shard) in shards.iter().enumerate() {
        let file = open_shard(shard)?;
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
        let groups: Vec<usize> = reader.metadata().row_groups().iter().map(|g| g.num_rows() as usize).collect();
        let wanted: Vec<&str> = [Some(image.as_str()), label.as_deref()].into_iter().flatten().collect();
        let rows = RowIter::from_file(Some(projection(&reader, &wanted)?), &reader)
            .with_context(|| format!("{}: unreadable rows", shard.display()))?
            .with_batch_size(ROWS_PER_READ);
        let mut count = 0;
        for (r, row) in rows.enumerate() {
            let row = row.with_context(|| format!("{}: row {r} unreadable", shard.display()))?;
            let at = || format!("{} row {r}", shard.display());
            let mut found_image = false;
            let mut found_label = None;
            for (name, field) in row.get_column_iter() {
                if *name == image {
                    image_bytes(field).with_context(at)?;
                    found_image = true;
                } else if Some(name) == label.as_ref() {
                    found_label = Some(label_of(field).with_context(at)?);
                }
            }
            ensure!(found_image, "{}: no image", at());
            if let (Some(all), Some(l)) = (labels.as_mut(), found_label) {
                let (first, other) =
                    if l.is_some() { (&mut labelled, &unlabelled) } else { (&mut unlabelled, &labelled) };
                first.get_or_insert_with(at);
                if let Some(other) = other {
                    let (with, without) = if l.is_some() { (at(), other.clone()) } else { (other.clone(), at()) };
                    bail!(
                        "{without}: no label (-1 or null), where {with} has one; a split is labelled throughout, or \
                         not at all (a test split's withheld labels)"
                    );
                }
                all.push(l.unwrap_or(-1));
            }
            count += 1;
        }
        ensure!(
            count == groups.iter().sum::<usize>(),
            "{}: {count} rows read where its row groups count {}",
            shard.display(),
            groups.iter().sum::<usize>()
        );
        placed.push(Shard { path: shard.clone(), image, first: len, groups });
        len += count;
    }
    ensure!(len > 0, "{}: holds no rows", path.display());
    let labels_withheld = labels.is_some() && labelled.is_none();
    if labels_withheld {
        // Every row's label is -1 or null: a test split whose labels are withheld, which `embed` and `adapt`
        // take as unlabelled data (and `eval` refuses as such).
        labels = None;
    }
    placed.retain(|s| s.groups.iter().sum::<usize>() > 0);
    let images = ParquetRows { shards: placed, len, cursor: Mutex::new(None) };
    Ok(ParquetImages { labels, labels_withheld, classes, images })
}

/// An image cell's encoded bytes: the `Image` feature's `bytes`, or a binary cell.
fn image_bytes(field: &Field) -> Result<&[u8]> {
    match field {
        Field::Bytes(b) => Ok(b.data()),
        Field::Group(group) => {
            let mut path = None;
            for (name, f) in group.get_column_iter() {
                match (name.as_str(), f) {
                    ("bytes", Field::Bytes(b)) => return Ok(b.data()),
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

/// A label cell as a class id, or `None` for a row without one: -1, as `datasets` stores a `ClassLabel`'s missing
/// value (a test split's withheld labels), or null.
fn label_of(field: &Field) -> Result<Option<i64>> {
    let id = match *field {
        Field::Byte(v) => v.into(),
        Field::Short(v) => v.into(),
        Field::Int(v) => v.into(),
        Field::Long(v) => v,
        Field::UByte(v) => v.into(),
        Field::UShort(v) => v.into(),
        Field::UInt(v) => v.into(),
        Field::ULong(v) => i64::try_from(v).context("label out of range")?,
        Field::Null => return Ok(None),
        ref other => bail!("the label is not an integer ({other})"),
    };
    match id {
        -1 => Ok(None),
        id => {
            ensure!(id >= 0, "label {id} is negative");
            Ok(Some(id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet").join(name)
    }

    #[test]
    fn rows_read_in_any_order_are_the_rows_read_in_order() {
        // by_name.parquet: seven rows in row groups of two; two_shards: four and three rows in two files.
        for name in ["by_name.parquet", "two_shards"] {
            let path = fixture(name);
            let open = || read_parquet(&path, &parquet_shards(&path).unwrap()).unwrap().images;
            let rows = open();
            assert_eq!(rows.count(), 7);
            let in_order = rows.read(&(0..7).collect::<Vec<_>>()).unwrap();
            assert!(in_order.windows(2).all(|w| w[0] != w[1]), "{name}: seven different images");
            // Backwards, forwards within a row group and past it, into the other shard and back, repeats.
            let order = [5, 1, 2, 6, 0, 3, 3, 4, 2];
            let jumbled = open().read(&order).unwrap();
            for (&i, bytes) in order.iter().zip(&jumbled) {
                assert!(*bytes == in_order[i], "{name}: row {i} read out of order");
            }
            assert!(rows.read(&[7]).is_err(), "{name}: a row past the end");
        }
    }

    #[test]
    fn a_split_whose_labels_are_withheld_is_unlabelled() {
        let open = |name: &str| {
            let path = fixture(name);
            read_parquet(&path, &parquet_shards(&path).unwrap())
        };
        // -1 in every row, `datasets`' missing ClassLabel (a test split's labels withheld): data for `embed` and
        // `adapt`, with its class names. It used to be refused as a negative label.
        let withheld = open("withheld_labels.parquet").unwrap();
        assert!(withheld.labels.is_none() && withheld.labels_withheld);
        assert!(!open("two_shards").unwrap().labels_withheld);
        assert_eq!(withheld.classes, Some(vec!["cat".to_string(), "dog".into(), "fish".into()]));
        assert_eq!(withheld.images.count(), 3);
        // Labels 1, -1, null: a split half labelled is refused at its first row without one.
        let err = format!("{:#}", open("some_labels.parquet").err().unwrap());
        let at = |row: usize| format!("{} row {row}", fixture("some_labels.parquet").display());
        assert_eq!(
            err,
            format!(
                "{}: no label (-1 or null), where {} has one; a split is labelled throughout, or not at all (a test \
                 split's withheld labels)",
                at(1),
                at(0)
            )
        );
    }

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
