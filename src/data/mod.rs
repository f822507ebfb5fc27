//! Image data: safetensors of preprocessed `pixel_values` or raw 8-bit `images` with `labels`, an ImageFolder
//! tree of image files (PNG, JPEG, WebP, BMP, GIF, TIFF, PNM) or a folder of such files without labels, or
//! Hugging Face datasets parquet, served in preprocessed batches.

mod class_names;
mod dataset;
mod decode;
mod image_folder;
mod parquet;
pub mod preprocess;
pub mod resample;

pub use class_names::dataset_class_names;
pub use dataset::Dataset;
pub use decode::{decode_image, jpeg_simd};
pub use image_folder::{scan_image_dir, ImageDir, ImageFolder};
pub(crate) use parquet::{is_parquet_file, parquet_shards, split_of};
pub use preprocess::{Preprocess, Resize};
