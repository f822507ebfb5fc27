//! CLIP's text side, for zero-shot classification heads made without Python: the BPE tokenizer, the text
//! tower with its projection, and FusionBench's averaging of prompt embeddings into class embeddings.

mod clip_text;
mod shared_prefix;
mod tokenizer;
mod zero_shot;

pub use clip_text::{ClipText, TextConfig};
pub use tokenizer::ClipTokenizer;
pub use zero_shot::{class_embeddings, fill, DEFAULT_TEMPLATE};
