//! Checkpoints: memory-mapped safetensors files, sharded stores, HF CLIP model directories.

mod model_dir;
mod safetensors_file;
mod store;
mod writer;

pub use model_dir::{ModelDir, ModelKind};
pub use safetensors_file::SafetensorsFile;
pub use store::TensorStore;
pub use writer::StreamingWriter;
