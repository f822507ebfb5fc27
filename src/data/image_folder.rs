//! ImageFolder trees: one subfolder per class, class ids in sorted name order, image files inside.

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

/// Lists an ImageFolder tree in a stable order.
pub fn scan_image_folder(root: &Path) -> Result<ImageFolder> {
    let classes: Vec<PathBuf> = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
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
    if let Some(first) = others.first() {
        bail!(
            "{}: {} image(s) in a format the engine does not read, first {}; convert them (to PNG, JPEG, WebP, BMP, \
             GIF, TIFF or PNM) or move them out",
            root.display(),
            others.len(),
            first.display()
        );
    }
    if files.is_empty() {
        bail!("{}: no class subfolders holding images (PNG, JPEG, WebP, BMP, GIF, TIFF, PNM)", root.display());
    }
    let classes = classes.iter().map(|c| c.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    Ok(ImageFolder { classes, files })
}
