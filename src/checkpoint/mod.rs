//! Checkpoints: memory-mapped safetensors files (and `torch.save` files, read without running their pickle),
//! sharded stores, HF CLIP model directories.

mod model_dir;
mod pickle;
mod safetensors_file;
mod store;
mod torch_zip;
mod writer;

pub use model_dir::{ModelDir, ModelKind};
pub use safetensors_file::SafetensorsFile;
pub use store::TensorStore;
pub use writer::StreamingWriter;
