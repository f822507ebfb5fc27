//! Load a CLIP checkpoint and embed a batch of images with the library.
//!
//! ```text
//! cargo run --release --example embed -- tests/fixtures/clip_a tests/fixtures/photos
//! ```
//! The second argument is any `<DATA>` (safetensors or ImageFolder); without it, a batch of zeros is used.

use std::path::PathBuf;

use anyhow::{Context, Result};
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::{self, DeviceRequest};
use wemoe_engine::model::{ImageEncoder, Routing};
use wemoe_engine::tensor::Tensor;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let model_dir = args.next().context("usage: embed MODEL_DIR [DATA]")?;
    let be = device::open(DeviceRequest::Auto, false)?;

    // Map the checkpoint and read its config; then load (and validate) the weights onto the device.
    let dir = ModelDir::open(&model_dir)?;
    let model = ImageEncoder::load(be.as_ref(), &dir)?;
    let side = dir.config.image_size;

    // A batch: the first 8 images of DATA, preprocessed as the model asks, or zeros.
    let pixels = match args.next() {
        Some(data) => {
            let data = Dataset::open(&data, &Preprocess::for_model(&dir.path, side)?, side)?;
            data.batch(0..data.len().min(8))?
        }
        None => Tensor::zeros(&[2, 3, side, side]),
    };

    let out = model.encode(be.as_ref(), &be.upload(pixels)?, Routing::Sample)?;
    println!("pooler_output {:?}", out.pooled.shape());
    if let Some(embeds) = &out.image_embeds {
        let first = &be.to_host(embeds)?[..embeds.shape()[1].min(4)];
        println!("image_embeds  {:?}, first row starts {first:.4?}", embeds.shape());
    }
    Ok(())
}
