//! `--weights` of `embed` and `eval`: the whole model loaded before the pass, or its encoder layers loaded
//! one at a time (`StreamedEncoder`).

use anyhow::Result;
use clap::ValueEnum;
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::device::{Backend, Device};
use wemoe_engine::eval::Encoder;
use wemoe_engine::model::{ImageEncoder, StreamedEncoder};

/// Where the encoder layers' weights live during a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Weights {
    /// Streamed on the CPU, resident on a GPU (whose memory holds the model and whose forward is too
    /// fast to hide a reload).
    #[default]
    Auto,
    /// Every layer loaded before the first image.
    Resident,
    /// One layer at a time, for each span of batches: peak memory about one layer's weights.
    Streamed,
}

/// The model of a pass, loaded as `--weights` says.
pub enum LoadedEncoder<'a> {
    /// Every layer loaded.
    Resident(ImageEncoder),
    /// Layers loaded as the pass reaches them.
    Streamed(StreamedEncoder<'a>),
}

impl<'a> LoadedEncoder<'a> {
    /// Loads `dir`'s encoder on `be` (for a streamed one, all but its layers).
    pub fn load(be: &dyn Backend, dir: &'a ModelDir, weights: Weights) -> Result<Self> {
        let streamed = match weights {
            Weights::Auto => be.device() == Device::Cpu,
            Weights::Resident => false,
            Weights::Streamed => true,
        };
        Ok(if streamed {
            LoadedEncoder::Streamed(StreamedEncoder::load(be, dir)?)
        } else {
            LoadedEncoder::Resident(ImageEncoder::load(be, dir)?)
        })
    }

    /// The encoder, for the passes of `wemoe_engine::eval`.
    pub fn encoder(&self) -> Encoder<'_> {
        match self {
            LoadedEncoder::Resident(model) => Encoder::Resident(model),
            LoadedEncoder::Streamed(streamed) => Encoder::Streamed(streamed),
        }
    }

    /// Seconds spent loading layers during passes so far (none when resident).
    pub fn layer_load_seconds(&self) -> f64 {
        match self {
            LoadedEncoder::Resident(_) => 0.0,
            LoadedEncoder::Streamed(streamed) => streamed.layer_load_seconds(),
        }
    }
}
