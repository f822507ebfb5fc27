//! A dataset's class names without opening its images: what zero-shot heads are made from.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::image_folder::{is_image, is_other_image};
use super::parquet::{parquet_class_names, parquet_shards};
use super::{scan_image_dir, ImageDir};

/// The class names of the dataset at `path`, in label order, as [`Dataset::open`](super::Dataset::open)
/// would have them: a parquet dataset's `ClassLabel` names (a file, a folder of one split's shards, or a
/// split's prefix), an ImageFolder's sorted class folders. `Ok(None)` when `path` is neither; an error for
/// a parquet dataset whose metadata names no classes, and for a folder of images without class subfolders or
/// one image.
pub fn dataset_class_names(path: &Path) -> Result<Option<Vec<String>>> {
    if let Some(shards) = parquet_shards(path) {
        let classes = parquet_class_names(path, &shards)?;
        let why = "its metadata names no classes (no ClassLabel feature); list them in a text file, one per line";
        return classes.map(Some).with_context(|| format!("{}: {why}", path.display()));
    }
    if path.is_dir() {
        return match scan_image_dir(path)? {
            ImageDir::Classes(folder) => Ok(Some(folder.classes)),
            ImageDir::Unlabelled(_) => bail!(
                "{}: images without class subfolders name no classes; list them in a text file, one per line",
                path.display()
            ),
        };
    }
    if path.is_file() && (is_image(path) || is_other_image(path)) {
        bail!("{}: an image names no classes; list them in a text file, one per line", path.display());
    }
    Ok(None)
}
