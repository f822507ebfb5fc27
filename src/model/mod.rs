//! The CLIP vision model, its projection and the classification heads, written once against
//! [`Backend`](crate::device::Backend). Module and field names follow HF transformers.

mod clip_vision;
mod heads;
mod image_encoder;
mod streamed;
mod weights;
mod wemoe;

pub use clip_vision::{
    ClipAttention, ClipEncoderLayer, ClipMlp, ClipVision, Embeddings, LayerNorm, Linear, Mlp, VisionOutput,
};
pub use heads::{Classifier, Heads};
pub use image_encoder::{EncoderOutput, ImageEncoder};
pub use streamed::StreamedEncoder;
pub use weights::{RandomWeights, WeightSource};
pub use wemoe::{gate_tensors, Router, RouterActivation, Routing, WemoeMlp, WemoeSpec};
