//! # wemoe-engine
//!
//! Merges fine-tuned CLIP vision transformers into one multi-task model with Weight-Ensembling Mixture
//! of Experts (WEMoE), adapts its routers at test time, and runs the result, on the CPU or a GPU.
//!
//! The library is layered:
//! - [`tensor`]: a shape and f32 storage on one device, host tensors borrowed from memory maps where they can be;
//! - [`checkpoint`]: HF CLIP directories and safetensors, memory-mapped and validated;
//! - [`config`]: the vision tower's dimensions from `config.json`;
//! - [`device`]: the [`Backend`](device::Backend) interface, its CPU and CUDA implementations;
//! - [`ops`]: the CPU reference of every operation;
//! - [`kernels`] and [`cuda`]: the CUDA sources, their NVRTC compilation and cache, and the executors that run
//!   them on a GPU or in the host emulation;
//! - [`model`]: the CLIP vision model, WEMoE layers, the projection, the classification heads;
//! - [`merge`]: WEMoE, task arithmetic, TIES-merging and averaging, streamed into the output file;
//! - [`data`]: datasets and CLIP's preprocessing;
//! - [`hub_cache`]: models and datasets named as on the Hugging Face Hub, found in its local cache;
//! - [`eval`]: accuracy of a model over tasks;
//! - [`text`]: CLIP's tokenizer and text tower, for zero-shot heads (`wemoe-engine heads`);
//! - [`autograd`]: the tape and the adaptation loss's router gradients;
//! - [`adapt`]: Adam, the routers' parameters, the task samplers and the checkpointed adaptation run;
//! - [`suite`]: the bundled multi-task suite the demo runs on;
//! - [`rng`]: the seeded generator of every initialisation and shuffle;
//! - [`output`]: atomic output files;
//! - [`run_lock`]: one run at a time in an output folder (`adapt`, AdaMerging).
//!
//! ```
//! use wemoe_engine::{checkpoint::ModelDir, device, model::{ImageEncoder, Routing}, tensor::Tensor};
//!
//! let be = device::open(device::DeviceRequest::Cpu, true)?;
//! // Any HF CLIP directory (or CLIPVisionModel); here the bundled suite's small pretrained model.
//! let dir = ModelDir::open("assets/suite/pretrained".as_ref())?;
//! let model = ImageEncoder::load(be.as_ref(), &dir)?;
//! let s = dir.config.image_size;
//! let pixels = Tensor::zeros(&[2, 3, s, s]);
//! let out = model.encode(be.as_ref(), &pixels, Routing::Sample)?;
//! assert_eq!(out.pooled.shape(), [2, dir.config.hidden_size]);
//! # anyhow::Ok(())
//! ```

// The library's public items are its API: each documented (CI's clippy makes this an error).
#![warn(missing_docs)]

pub mod adapt;
pub mod autograd;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod data;
pub mod device;
pub mod eval;
pub mod heap;
pub mod hub_cache;
pub mod kernels;
pub mod merge;
pub mod model;
pub mod ops;
pub mod output;
pub mod partial;
pub mod rng;
pub mod run_lock;
pub mod suite;
pub mod tensor;
pub mod text;
