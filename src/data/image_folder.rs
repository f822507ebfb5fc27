//! Folders of images: ImageFolder trees (one subfolder per class, class ids in sorted name order, image files
//! inside), or images straight inside a folder, unlabelled.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// The formats the engine decodes: those torchvision's ImageFolder reads, plus GIF and PBM/PNM.
fn is_image(path: &Path) -> bool {
    matches!(
        extension(path).as_deref(),
        Some("png" | "jpg" | "jpeg" | "webp" | "bmp" | "gif" | "tif" | "tiff" | "ppm" | "pgm" | "pbm" | "pnm")
    )
}

/// Image formats Pillow or a camera may give, which the engine does not decode: refused rather than
/// skipped, so that a task is never silently smaller than the user's.
fn is_other_image(path: &Path) -> bool {
    matches!(
        extension(path).as_deref(),
        Some("avif" | "heic" | "heif" | "jxl" | "jp2" | "j2k" | "ico" | "tga" | "exr" | "hdr" | "dds" | "svg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.retain(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')));
    entries.sort();
    Ok(entries)
}

/// An ImageFolder tree's classes and files.
pub struct ImageFolder {
    /// Class names, sorted; a class id is an index here.
    pub classes: Vec<String>,
    /// Every image with its class id, in sorted order.
    pub files: Vec<(PathBuf, i64)>,
}

/// The class subfolders among `root`'s sorted `entries` and their images, perhaps none.
fn class_folders(root: &Path, entries: &[PathBuf]) -> Result<ImageFolder> {
    let classes: Vec<PathBuf> = entries.iter().filter(|p| p.is_dir()).cloned().collect();
    let mut files = Vec::new();
    let mut others = Vec::new();
    for (id, class) in classes.iter().enumerate() {
        for file in sorted_entries(class)? {
            if file.is_file() && is_image(&file) {
                files.push((file, id as i64));
            } else if file.is_file() && is_other_image(&file) {
                others.push(file);
            }
        }
    }
    refuse_other_images(root, &others)?;
    let classes = classes.iter().map(|c| c.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    Ok(ImageFolder { classes, files })
}

/// A folder given as data: an ImageFolder tree, or images straight inside it.
pub enum ImageDir {
    /// Class subfolders of images.
    Classes(ImageFolder),
    /// Images in the folder itself, sorted by name, without labels (what `embed` and `adapt` can take).
    Unlabelled(Vec<PathBuf>),
}

/// Lists a folder of images: the images straight inside it, unlabelled, or else its class subfolders' (an
/// ImageFolder). A folder with images in both places is refused: which the user means cannot be told, and
/// neither set may be dropped silently.
pub fn scan_image_dir(root: &Path) -> Result<ImageDir> {
    let entries = sorted_entries(root)?;
    let loose: Vec<PathBuf> = entries.iter().filter(|p| p.is_file() && is_image(p)).cloned().collect();
    let others: Vec<PathBuf> = entries.iter().filter(|p| p.is_file() && is_other_image(p)).cloned().collect();
    refuse_other_images(root, &others)?;
    if loose.is_empty() {
        let folder = class_folders(root, &entries)?;
        if folder.files.is_empty() {
            bail!("{}: no images in it nor in class subfolders (PNG, JPEG, WebP, BMP, GIF, TIFF, PNM)", root.display());
        }
        return Ok(ImageDir::Classes(folder));
    }
    for dir in entries.iter().filter(|p| p.is_dir()) {
        if let Some(nested) = sorted_entries(dir)?.into_iter().find(|f| f.is_file() && is_image(f)) {
            bail!(
                "{}: holds images both in it ({} first) and in subfolders ({} first); an ImageFolder keeps its \
                 images in class subfolders only, a folder of unlabelled images in itself only",
                root.display(),
                loose[0].display(),
                nested.display()
            );
        }
    }
    Ok(ImageDir::Unlabelled(loose))
}

/// Fails, naming the first, when `others` holds images in formats the engine does not decode.
fn refuse_other_images(root: &Path, others: &[PathBuf]) -> Result<()> {
    if let Some(first) = others.first() {
        bail!(
            "{}: {} image(s) in a format the engine does not read, first {}; convert them (to PNG, JPEG, WebP, BMP, \
             GIF, TIFF or PNM) or move them out",
            root.display(),
            others.len(),
            first.display()
        );
    }
    Ok(())
}
