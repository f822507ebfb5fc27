//! A dataset opened from a `<DATA>` path, checked up front and served in preprocessed batches.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::decode::decode_image;
use super::image_folder::{is_image, is_other_image};
use super::parquet::{parquet_shards, read_parquet, ParquetRows};
use super::Preprocess;
use super::{scan_image_dir, ImageDir};
use crate::checkpoint::SafetensorsFile;
use crate::tensor::Tensor;

enum Source {
    /// Preprocessed `[N, 3, S, S]` f32, read in place where aligned.
    Pixels(Tensor),
    /// Raw `[N, H, W, C]` u8 images in a safetensors file.
    Images { file: SafetensorsFile, height: usize, width: usize, channels: usize },
    /// Image files, decoded on demand.
    Files(Vec<PathBuf>),
    /// A parquet dataset's encoded images, read from its files as batches ask for them.
    Parquet(ParquetRows),
    /// Encoded images held in memory (a parquet dataset's, after [`Dataset::hold_in_memory`]).
    Encoded(Vec<Vec<u8>>),
}

/// Images (and labels, when known) ready to be batched at the model's input size.
pub struct Dataset {
    origin: PathBuf,
    source: Source,
    len: usize,
    labels: Option<Vec<i64>>,
    /// Why there are no labels, when there are none.
    unlabelled: Option<&'static str>,
    classes: Option<Vec<String>>,
    preprocess: Preprocess,
    side: usize,
}

impl Dataset {
    /// Opens `path` for a model taking `side × side` images prepared by `preprocess`.
    pub fn open(path: &Path, preprocess: &Preprocess, side: usize) -> Result<Self> {
        let mut labels_withheld = false;
        let (source, len, labels, classes) = if let Some(shards) = parquet_shards(path) {
            let rows = read_parquet(path, &shards)?;
            let len = rows.images.count();
            labels_withheld = rows.labels_withheld;
            (Source::Parquet(rows.images), len, rows.labels, rows.classes)
        } else if !path.exists() {
            crate::hub_cache::check_not_dangling(path)?;
            bail!("{}: no such file or directory", path.display());
        } else if path.is_dir() {
            match scan_image_dir(path)? {
                ImageDir::Classes(folder) => {
                    let labels = folder.files.iter().map(|(_, id)| *id).collect();
                    let files: Vec<PathBuf> = folder.files.into_iter().map(|(f, _)| f).collect();
                    let len = files.len();
                    (Source::Files(files), len, Some(labels), Some(folder.classes))
                }
                ImageDir::Unlabelled(files) => {
                    let len = files.len();
                    (Source::Files(files), len, None, None)
                }
            }
        } else if is_image(path) {
            // One image file: a dataset of one, unlabelled (`embed --images photo.jpg`).
            (Source::Files(vec![path.to_path_buf()]), 1, None, None)
        } else if is_other_image(path) {
            bail!(
                "{}: an image in a format the engine does not read; convert it (to PNG, JPEG, WebP, BMP, GIF, TIFF \
                 or PNM)",
                path.display()
            );
        } else {
            Self::open_safetensors(path, side)?
        };
        ensure!(len > 0, "{}: holds no images", path.display());
        if !matches!(source, Source::Pixels(_)) {
            // Raw images of any size must come out of the preprocessing at the model's size.
            let made = match preprocess.output_size() {
                Some(size) if size == (side, side) => None,
                Some((h, w)) => Some(format!("makes {w}×{h} images")),
                None => Some("keeps each image's size (no crop, no resize to a fixed size)".to_string()),
            };
            if let Some(made) = made {
                bail!("{}: the model's preprocessing {made}, the model takes {side}×{side}", path.display());
            }
        }
        let unlabelled = labels.is_none().then_some(match &source {
            Source::Parquet(_) if labels_withheld => "every row's label is -1 or null (withheld)",
            Source::Parquet(_) => "no label column (a ClassLabel feature, or a column named label or labels)",
            Source::Files(_) if path.is_file() => "one image file",
            Source::Files(_) => "images straight in the folder, no class subfolders",
            _ => "no labels tensor",
        });
        let preprocess = preprocess.clone();
        Ok(Dataset { origin: path.to_path_buf(), source, len, labels, unlabelled, classes, preprocess, side })
    }

    #[allow(clippy::type_complexity)]
    fn open_safetensors(path: &Path, side: usize) -> Result<(Source, usize, Option<Vec<i64>>, Option<Vec<String>>)> {
        let named_safetensors = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        let file = SafetensorsFile::open(path).map_err(|err| {
            // A file of any other kind (a single image, a CSV) fails as safetensors; say what `--images` takes.
            if named_safetensors {
                err
            } else {
                err.context(format!(
                    "{}: not a dataset the engine reads (a safetensors file of pixel_values or images, a parquet \
                     file or folder of shards, an ImageFolder directory of class subfolders, a folder of images or \
                     one image)",
                    path.display()
                ))
            }
        })?;
        let shape_of = |name: &str| file.info(name).map(|i| i.shape.clone());
        let (source, len, labels) = if let Some(shape) = shape_of("pixel_values") {
            ensure!(
                shape.len() == 4 && shape[1] == 3 && shape[2] == side && shape[3] == side,
                "{}: pixel_values have shape {shape:?}, the model takes [N, 3, {side}, {side}]",
                path.display()
            );
            let pixels = file.f32("pixel_values")?;
            if let Some((at, v)) = pixels.first_non_finite()? {
                bail!("{}: pixel_values hold a non-finite value ({v} at element {at})", path.display());
            }
            let labels = read_labels(path, &file, shape[0])?;
            (Source::Pixels(pixels), shape[0], labels)
        } else if let Some(shape) = shape_of("images") {
            ensure!(
                shape.len() == 4 && (1..=4).contains(&shape[3]) && shape[1] > 0 && shape[2] > 0,
                "{}: images have shape {shape:?}, expected [N, H, W, C] with C = 1 (grey), 2 (grey, alpha), 3 (RGB) \
                 or 4 (RGBA)",
                path.display()
            );
            file.u8("images")?;
            let (height, width, channels) = (shape[1], shape[2], shape[3]);
            let labels = read_labels(path, &file, shape[0])?;
            (Source::Images { file, height, width, channels }, shape[0], labels)
        } else {
            bail!("{}: has neither 'pixel_values' nor 'images'", path.display());
        };
        Ok((source, len, labels, None))
    }

    /// Where the data came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no images (never, for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The labels, when the data has them.
    pub fn labels(&self) -> Option<&[i64]> {
        self.labels.as_deref()
    }

    /// Why the data has no labels, for the error of a command that needs them; `None` when it has them.
    pub fn why_unlabelled(&self) -> Option<&'static str> {
        self.unlabelled
    }

    /// The class names of an ImageFolder tree, or of a parquet dataset's label column (from its metadata).
    pub fn classes(&self) -> Option<&[String]> {
        self.classes.as_deref()
    }

    /// The image files of a folder, one per row in order, relative to the folder (`/`-separated); `None` for
    /// other data.
    pub fn files(&self) -> Option<Vec<String>> {
        let Source::Files(files) = &self.source else { return None };
        let relative = |f: &PathBuf| {
            // A folder's files by their path in it; one image given alone by its name.
            let within = f.strip_prefix(&self.origin).ok().filter(|p| !p.as_os_str().is_empty());
            let within = within.unwrap_or_else(|| f.file_name().map_or(f.as_path(), Path::new));
            within.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
        };
        Some(files.iter().map(relative).collect())
    }

    /// Reads a parquet dataset's encoded images into memory, for random access (adaptation draws shuffled
    /// batches, which would reopen the files at every image); other data is left as it is.
    pub fn hold_in_memory(&mut self) -> Result<()> {
        if let Source::Parquet(rows) = &self.source {
            self.source = Source::Encoded(rows.read(&(0..self.len).collect::<Vec<_>>())?);
        }
        Ok(())
    }

    /// Images `range` as pixel values `[b, 3, S, S]`.
    pub fn batch(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        ensure!(range.end <= self.len && range.start < range.end, "batch {range:?} of {} images", self.len);
        self.gather(&range.collect::<Vec<_>>())
    }

    /// Images `indices` (in that order) as pixel values `[b, 3, S, S]`.
    pub fn gather(&self, indices: &[usize]) -> Result<Tensor> {
        ensure!(!indices.is_empty(), "an empty batch");
        if let Some(bad) = indices.iter().find(|&&i| i >= self.len) {
            bail!("image {bad} of {} in {}", self.len, self.origin.display());
        }
        let s = self.side;
        let per = 3 * s * s;
        let n = indices.len();
        let values = match &self.source {
            Source::Pixels(t) => {
                let all = t.host()?;
                indices.iter().flat_map(|&i| all[i * per..(i + 1) * per].iter().copied()).collect()
            }
            Source::Images { file, height, width, channels } => {
                let (_, bytes) = file.u8("images")?;
                let one = height * width * channels;
                let images: Vec<Vec<f32>> = indices
                    .par_iter()
                    .map(|&i| {
                        self.preprocess
                            .apply(&bytes[i * one..(i + 1) * one], *height, *width, *channels)
                            .with_context(|| format!("{}: image {i}", self.origin.display()))
                    })
                    .collect::<Result<_>>()?;
                images.concat()
            }
            Source::Files(files) => {
                let images: Vec<Vec<f32>> =
                    indices.par_iter().map(|&i| self.load_file(&files[i])).collect::<Result<_>>()?;
                images.concat()
            }
            Source::Parquet(rows) => {
                let encoded = rows.read(indices)?;
                let images: Vec<Vec<f32>> = (indices, &encoded[..])
                    .into_par_iter()
                    .map(|(&i, bytes)| self.load_encoded(bytes, &format_args!("{} row {i}", self.origin.display())))
                    .collect::<Result<_>>()?;
                images.concat()
            }
            Source::Encoded(rows) => {
                let images: Vec<Vec<f32>> = indices
                    .par_iter()
                    .map(|&i| self.load_encoded(&rows[i], &format_args!("{} row {i}", self.origin.display())))
                    .collect::<Result<_>>()?;
                images.concat()
            }
        };
        Tensor::from_vec(&[n, 3, s, s], values)
    }

    fn load_file(&self, path: &Path) -> Result<Vec<f32>> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        self.load_encoded(&bytes, &path.display())
    }

    /// Decodes and preprocesses one encoded image; `what` names it in errors.
    fn load_encoded(&self, bytes: &[u8], what: &dyn std::fmt::Display) -> Result<Vec<f32>> {
        let (pixels, height, width, channels) =
            decode_image(bytes).map_err(|e| anyhow::anyhow!("{what}: cannot decode image: {e}"))?;
        self.preprocess.apply(&pixels, height, width, channels).with_context(|| format!("{what}"))
    }
}

fn read_labels(path: &Path, file: &SafetensorsFile, len: usize) -> Result<Option<Vec<i64>>> {
    let Some(info) = file.info("labels") else { return Ok(None) };
    ensure!(info.shape.as_slice() == [len], "{}: labels have shape {:?}, expected [{len}]", path.display(), info.shape);
    let labels = file.integers("labels")?;
    if let Some(bad) = labels.iter().find(|&&l| l < 0) {
        bail!("{}: label {bad} is negative", path.display());
    }
    Ok(Some(labels))
}
