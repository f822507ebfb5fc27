//! Folders of images: ImageFolder trees (one subfolder per class, class ids in sorted name order, image files
//! inside), or images straight inside a folder, unlabelled.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// The formats the engine decodes: those torchvision's ImageFolder reads, plus GIF and PBM/PNM.
pub(crate) fn is_image(path: &Path) -> bool {
    matches!(
        extension(path).as_deref(),
        Some("png" | "jpg" | "jpeg" | "webp" | "bmp" | "gif" | "tif" | "tiff" | "ppm" | "pgm" | "pbm" | "pnm")
    )
}

/// Image formats Pillow or a camera may give, which the engine does not decode: refused rather than
/// skipped, so that a task is never silently smaller than the user's.
pub(crate) fn is_other_image(path: &Path) -> bool {
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

/// The images anywhere under `dir`, in torchvision's order: `sorted(os.walk(dir, followlinks=True))` (folders by
/// their path as a string, so `a` < `a/b` < `a/b/c` < `a/b2`), each folder's files by name; and the images in
/// formats the engine does not read, into `others`. A folder reached twice through links is walked once.
fn images_under(dir: &Path, others: &mut Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut folders = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    let mut walked = std::collections::HashSet::new();
    while let Some(folder) = pending.pop() {
        if !walked.insert(folder.canonicalize().unwrap_or_else(|_| folder.clone())) {
            continue;
        }
        let entries = sorted_entries(&folder)?;
        pending.extend(entries.iter().filter(|p| p.is_dir()).cloned());
        folders.push((folder, entries));
    }
    folders.sort_by(|(a, _), (b, _)| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
    let mut images = Vec::new();
    for file in folders.into_iter().flat_map(|(_, entries)| entries).filter(|p| !p.is_dir()) {
        if is_image(&file) || is_other_image(&file) {
            // torchvision lists a link to nothing as an image, then fails to open it: refused, not left out.
            crate::hub_cache::check_not_dangling(&file)?;
        }
        if !file.is_file() {
            continue;
        }
        if is_image(&file) {
            images.push(file);
        } else if is_other_image(&file) {
            others.push(file);
        }
    }
    Ok(images)
}

/// The class subfolders among `root`'s sorted `entries` and their images (in subfolders of theirs too, as
/// torchvision's ImageFolder takes them), perhaps none.
fn class_folders(root: &Path, entries: &[PathBuf]) -> Result<ImageFolder> {
    let classes: Vec<PathBuf> = entries.iter().filter(|p| p.is_dir()).cloned().collect();
    let mut files = Vec::new();
    let mut others = Vec::new();
    for (id, class) in classes.iter().enumerate() {
        files.extend(images_under(class, &mut others)?.into_iter().map(|file| (file, id as i64)));
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
    for image in entries.iter().filter(|p| is_image(p) || is_other_image(p)) {
        crate::hub_cache::check_not_dangling(image)?;
    }
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
        if let Some(nested) = images_under(dir, &mut Vec::new())?.into_iter().next() {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree of empty `.png` files (listing never decodes) under a fresh folder, and links `(link, target)`.
    fn tree(files: &[&str], links: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for file in files {
            let path = root.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        for (link, target) in links {
            std::os::unix::fs::symlink(target, root.path().join(link)).unwrap();
        }
        root
    }

    #[test]
    fn class_folders_take_nested_images_in_torchvisions_order() {
        // As `sorted(os.walk(class, followlinks=True))` lists them (checked with Python): folders by their path as
        // a string ('-' < '/' < '2'), files by name, a link back up walked once; hidden entries are skipped (where
        // torchvision would take .hidden/h.png after y.png), as everywhere in the engine.
        let files = ["b/z.png", "a/sub2/v.png", "a/sub/deeper/w.png", "a/sub-x/u.png", "a/sub/x.png", "a/y.png"];
        let root = tree(&[&files[..], &["a/.hidden/h.png"]].concat(), &[("a/sub/loop", "..")]);
        let ImageDir::Classes(folder) = scan_image_dir(root.path()).unwrap() else { panic!("not an ImageFolder") };
        assert_eq!(folder.classes, ["a", "b"]);
        let listed: Vec<(String, i64)> = folder
            .files
            .iter()
            .map(|(p, id)| (p.strip_prefix(root.path()).unwrap().display().to_string(), *id))
            .collect();
        let a = ["a/y.png", "a/sub/x.png", "a/sub-x/u.png", "a/sub/deeper/w.png", "a/sub2/v.png"];
        let want: Vec<(String, i64)> = a.iter().map(|p| (p.to_string(), 0)).chain([("b/z.png".into(), 1)]).collect();
        assert_eq!(listed, want);
    }

    #[test]
    fn loose_images_beside_images_deeper_down_are_refused() {
        let root = tree(&["loose.png", "sub/deeper/nested.png"], &[]);
        let err = scan_image_dir(root.path()).err().unwrap().to_string();
        assert!(err.contains("holds images both in it") && err.contains("deeper/nested.png"), "{err}");
    }
}
