//! CLIP's text side, for zero-shot classification heads made without Python: the BPE tokenizer, the text
//! tower with its projection, and FusionBench's averaging of prompt embeddings into class embeddings.

mod clip_text;
mod shared_prefix;
mod tokenizer;
mod zero_shot;

pub use clip_text::{ClipText, Embedded, TextConfig};
pub use tokenizer::{ClipTokenizer, TokenizerFiles};
pub use zero_shot::{class_embeddings, ClassEmbeddings, TaskPrompts, DEFAULT_TEMPLATE};
